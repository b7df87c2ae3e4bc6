"""
The Python client (dispatcher.client) against a real `twistd -n dispatcher`:
the blocking Client and the TwistedClient, each call decoded into the
server's wire types, refusals raised typed, a submit's Idempotency-Key
reused when its answer is lost or the daemon restarts, pages followed, a
wait that long-polls, a followed log resumed where it was cut; and a client
generated from the served OpenAPI document by a stock generator.
"""

import datetime
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
import uuid

import httpx
import msgspec
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from treq.testing import StubTreq

from dispatcher.client import (
    BadRequest,
    Client,
    Conflict,
    DispatcherError,
    Forbidden,
    JobState,
    JobSubmission,
    JobView,
    NotFound,
    QuotaExceeded,
    SubmittedJobs,
    TwistedClient,
    Unauthorized,
    Unavailable,
    Unreachable,
    WaitTimeout,
)
from dispatcher.client._settings import dispatcher_token, dispatcher_url

from .test_twistd import BIN, Twistd

INI = """
[tasks]
add = tests.tasks:add
[quota:owner=bounded]
rate = 1
burst = 1
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One daemon for the tests that need no daemon of their own."""
    daemon = Twistd(str(tmp_path_factory.mktemp("client")), INI)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def client(served):
    with Client(served.url, served.token) as c:
        yield c


def _credential(served, name, role):
    """A new credential's token, made through the API."""
    code, made = served.request("POST", "/v1/credentials", {"name": name, "role": role})
    assert code == 201, made
    return made["token"]


def _label():
    return {"test": uuid.uuid4().hex}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Retries:
    """The client's 'trying again' log events, while in a with block."""

    def __enter__(self):
        self.events = []
        globalLogPublisher.addObserver(self._seen)
        return self

    def _seen(self, event):
        if "trying again" in event.get("log_format", ""):
            self.events.append(event)

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self._seen)


class AnswerCutter:
    """
    A TCP proxy on loopback to a daemon that, for its first C{cuts}
    connections, closes the connection to the client as soon as the
    daemon's answer holds C{marker} (C{None}: before any of it is passed
    on), as a network that fails mid-answer does; it keeps what each
    connection's client sent.
    """

    def __init__(self, port, marker=None, cuts=1):
        self.port = port
        self.marker = marker
        self.cuts = cuts
        self.requests = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._threads = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            cut = self.cuts > 0
            self.cuts -= 1
            thread = threading.Thread(target=self._serve, args=(conn, cut), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn, cut):
        sent = bytearray()
        answer = bytearray()
        self.requests.append(sent)
        upstream = socket.create_connection(("127.0.0.1", self.port))
        try:
            while True:
                readable, _, _ = select.select([conn, upstream], [], [], 30)
                if not readable:
                    return
                if conn in readable:
                    data = conn.recv(65536)
                    if not data:
                        return
                    sent += data
                    upstream.sendall(data)
                if upstream in readable:
                    data = upstream.recv(65536)
                    if not data:
                        return
                    if cut and self.marker is None:
                        return
                    answer += data
                    conn.sendall(data)
                    if cut and self.marker in answer:
                        return
        finally:
            conn.close()
            upstream.close()

    def close(self):
        self.listener.close()
        for thread in self._threads:
            thread.join(10)


# The blocking client

def test_submit_wait_log_and_delete(client):
    """A submitted job comes back as a JobView with its fields; wait()
    returns it once it has ended; its log is its output, from an offset
    too; deleted, it is a NotFound."""
    labels = _label()
    job = client.submit(["sh", "-c", "echo out; echo err >&2"], name="greet", labels=labels)
    assert isinstance(job, JobView)
    assert (job.name, job.labels, job.command) == ("greet", labels, ["sh", "-c", "echo out; echo err >&2"])
    done = client.wait(job.id, timeout=30)
    assert done.state is JobState.SUCCEEDED and done.exit_code == 0
    assert client.log(job.id) == b"out\n"
    assert client.log(job.id, "stderr") == b"err\n"
    assert client.log(job.id, offset=2) == b"t\n"
    assert client.log(job.id, attempt=1) == b"out\n"
    client.delete(job.id)
    with pytest.raises(NotFound) as caught:
        client.job(job.id)
    assert caught.value.status == 404 and caught.value.code == "not_found"


def test_a_job_submission_and_a_task(client):
    """submit() takes a whole JobSubmission too, and a task with its
    arguments; the task's result comes back decoded."""
    job = client.submit(JobSubmission(task="add", args=[2, 3], labels=_label()))
    assert client.wait(job.id, timeout=30).result == 5


def test_arrays_and_batches_answer_their_jobs(client):
    """An array answers SubmittedJobs with each member's place; a batch
    answers its jobs in order, which wait() follows to their ends."""
    made = client.submit(["true"], array=3, labels=_label())
    assert isinstance(made, SubmittedJobs)
    assert [j.array_index for j in made.jobs] == [0, 1, 2]
    assert len({j.array_id for j in made.jobs}) == 1
    batch = client.submit_batch([{"command": ["true"]}, JobSubmission(command=["false"]),
                                 {"command": ["true"], "depends_on": [0]}])
    ended = client.wait([j.id for j in batch.jobs], timeout=30)
    assert [j.id for j in ended] == [j.id for j in batch.jobs]
    assert [j.state.value for j in ended] == ["succeeded", "failed", "succeeded"]


def test_arrays_and_batches_as_wholes(client):
    """An array and a batch are read, waited for, cancelled and retried as
    wholes (JobGroup); a cancel of one whose members have all finished is
    a Conflict, and so is a retry of one with none to retry."""
    labels = _label()
    made = client.submit(["sleep", "60"], array=3, labels=labels)
    array_id = made.jobs[0].array_id
    group = client.array(array_id)
    assert (group.id, group.kind, group.size, group.final) == (array_id, "array", 3, False)
    client.cancel_array(array_id)
    group = client.array(array_id, wait=30)
    assert group.final and not group.succeeded and group.counts[JobState.CANCELLED] == 3
    assert not client.retry_array(array_id).final
    client.cancel_array(array_id)
    assert client.array(array_id, wait=30).final
    with pytest.raises(Conflict):
        client.cancel_array(array_id)
    batch = client.submit_batch([{"command": ["true"], "labels": labels},
                                 {"command": ["true"], "labels": labels}])
    assert batch.batch_id is not None
    group = client.batch(batch.batch_id, wait=30)
    assert (group.kind, group.size, group.final, group.succeeded) == ("batch", 2, True, True)
    with pytest.raises(Conflict):
        client.retry_batch(batch.batch_id)
    with pytest.raises(Conflict):
        client.cancel_batch(batch.batch_id)
    with pytest.raises(NotFound):
        client.array(batch.batch_id)
    assert [j.id for j in client.jobs(array=array_id)] == [j.id for j in made.jobs]
    assert [j.id for j in client.jobs(batch=batch.batch_id)] == [j.id for j in batch.jobs]


def test_job_filters_reach_the_daemon(client):
    """jobs() passes its filters as the daemon reads them: several states,
    newest first, a time range from an aware datetime or epoch seconds,
    a name."""
    labels = _label()
    ok = client.submit(["true"], labels=labels, name="ok")
    bad = client.submit(["false"], labels=labels)
    client.wait([ok.id, bad.id], timeout=30)
    running = client.submit(["sleep", "60"], labels=labels)
    ids = [ok.id, bad.id, running.id]
    assert [j.id for j in client.jobs(label=labels, order="newest")] == ids[::-1]
    assert [j.id for j in client.jobs(label=labels, state=["failed", "succeeded"])] == ids[:2]
    assert [j.id for j in client.jobs(label=labels, name="ok")] == [ok.id]
    now = datetime.datetime.now(datetime.timezone.utc)
    assert list(client.jobs(label=labels, created_after=now + datetime.timedelta(hours=1))) == []
    assert [j.id for j in client.jobs(label=labels, created_before=time.time() + 3600)] == ids
    client.cancel(running.id)


def test_wait_is_one_long_poll(served, client):
    """wait() asks once with ?wait= and is answered when the job ends, not
    by polling."""
    job = client.submit(["sleep", "1.5"], labels=_label())
    proxy = AnswerCutter(int(served.url.rsplit(":", 1)[1]), cuts=0)
    try:
        with Client(proxy.url, served.token) as c:
            started = time.monotonic()
            assert c.wait(job.id, timeout=60).state is JobState.SUCCEEDED
            assert time.monotonic() - started < 10
        asked = re.findall(rb"GET (\S+) HTTP", b"".join(proxy.requests))
        assert len(asked) == 1 and b"wait=60" in asked[0]
    finally:
        proxy.close()


def test_jobs_follows_every_page(client):
    """jobs() yields every job matching its filters, oldest first, across
    pages of page_size jobs."""
    labels = _label()
    ids = [client.submit(["true"], labels=labels).id for _ in range(5)]
    assert [j.id for j in client.jobs(label=labels, page_size=2)] == ids
    assert [j.id for j in client.jobs(label=[f"test={labels['test']}"], page_size=1000)] == ids
    assert list(client.jobs(label={"test": "none of them"})) == []


def test_cancel_and_retry(client):
    """A running job cancelled ends cancelled; retried, it runs again; a
    second cancel of an ended job is a Conflict naming the job."""
    job = client.submit(["sleep", "60"], labels=_label())
    client.cancel(job.id)
    assert client.wait(job.id, timeout=30).state is JobState.CANCELLED
    with pytest.raises(Conflict) as caught:
        client.cancel(job.id)
    assert caught.value.field == "id" and "cancelled" in caught.value.message
    again = client.retry(job.id)
    assert again.state in (JobState.QUEUED, JobState.RUNNING, JobState.PENDING)
    client.cancel(job.id)
    assert client.wait(job.id, timeout=30).state is JobState.CANCELLED


def test_wait_times_out_with_the_jobs_as_seen(client):
    """wait() that runs out of time raises WaitTimeout holding the job as
    it last was, within a bounded time of its timeout."""
    job = client.submit(["sleep", "60"], labels=_label())
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as caught:
        client.wait(job.id, timeout=1.5)
    assert 1.4 < time.monotonic() - started < 10
    assert [j.id for j in caught.value.jobs] == [job.id]
    assert not caught.value.jobs[0].state.final
    client.cancel(job.id)


def test_refusals_are_typed(served, client):
    """Each refusal is raised as the error of its status, with the body's
    code, message and field: 400, 401, 403, 404, 409 and 429 (with
    retry_after)."""
    with pytest.raises(BadRequest) as caught:
        client.submit(["true"], queue="no-such-queue")
    assert (caught.value.code, caught.value.field) == ("unknown_queue", "queue")
    with pytest.raises(BadRequest) as caught:
        list(client.jobs(state="lost"))
    assert caught.value.field == "state"
    with pytest.raises(Unauthorized):
        Client(served.url, "not-a-token").me()
    reader = _credential(served, f"reader-{uuid.uuid4().hex[:8]}", "reader")
    with Client(served.url, reader) as as_reader:
        assert as_reader.me().role.value == "reader"
        with pytest.raises(Forbidden):
            as_reader.submit(["true"])
    with pytest.raises(NotFound):
        client.job("no-such-job")
    bounded = _credential(served, "bounded", "submitter")
    with Client(served.url, bounded) as as_bounded:
        as_bounded.submit(["true"])
        with pytest.raises(QuotaExceeded) as caught:
            as_bounded.submit(["true"])
    assert caught.value.status == 429 and caught.value.retry_after >= 1
    assert isinstance(caught.value, DispatcherError)
    with pytest.raises(TypeError, match="no_such_field"):
        client.submit(["true"], no_such_field=1)
    with pytest.raises(TypeError, match="argv"):
        client.submit("echo hi")


def test_queues_workers_and_me(client):
    """queues(), workers() and me() answer their wire types."""
    queues = client.queues()
    assert set(queues["default"].counts) >= {"queued", "running", "succeeded"}
    assert client.workers() == []
    me = client.me()
    assert (me.name, me.role.value) == ("admin", "admin")


def test_url_and_token_from_the_environment(served, tmp_path, monkeypatch):
    """Without arguments the client reads DISPATCHER_URL and the token from
    DISPATCHER_TOKEN, else the file DISPATCHER_TOKEN_FILE names, else
    ./var/admin.token."""
    assert dispatcher_url(environ={}) == "http://127.0.0.1:8080"
    assert dispatcher_url(environ={"DISPATCHER_URL": "http://h:1/"}) == "http://h:1"
    token_file = tmp_path / "token"
    token_file.write_text(served.token + "\n")
    monkeypatch.chdir(tmp_path)
    assert dispatcher_token(environ={}) is None
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "admin.token").write_text("local\n")
    assert dispatcher_token(environ={}) == "local"
    assert dispatcher_token(environ={"DISPATCHER_TOKEN_FILE": str(token_file)}) == served.token
    assert dispatcher_token(environ={"DISPATCHER_TOKEN": "t", "DISPATCHER_TOKEN_FILE": "x"}) == "t"
    with pytest.raises(OSError, match="DISPATCHER_TOKEN_FILE=/nonexistent"):
        dispatcher_token(environ={"DISPATCHER_TOKEN_FILE": "/nonexistent"})
    monkeypatch.setenv("DISPATCHER_URL", served.url)
    monkeypatch.setenv("DISPATCHER_TOKEN_FILE", str(token_file))
    with Client() as c:
        assert c.me().name == "admin"


def test_a_lost_answer_is_retried_with_the_same_key(served, client):
    """A submit whose answer is lost after the daemon stored the job is sent
    again with the same Idempotency-Key, and the daemon makes the job
    once; the next submit call makes a key of its own."""
    proxy = AnswerCutter(int(served.url.rsplit(":", 1)[1]))
    try:
        labels = _label()
        with Client(proxy.url, served.token) as c, _Retries() as retries:
            job = c.submit(["true"], labels=labels)
            other = c.submit(["true"], labels=labels)
        keys = [k for sent in proxy.requests
                for k in re.findall(rb"idempotency-key: (\S+)", sent, re.I)]
        assert len(keys) == 3 and keys[0] == keys[1] != keys[2]
        assert len(retries.events) == 1
        assert [j.id for j in client.jobs(label=labels)] == [job.id, other.id]
    finally:
        proxy.close()


def test_a_cancel_whose_answer_is_lost_is_not_sent_again(served, client):
    """A call that may not be sent twice (a cancel) is not retried once it
    was sent: Unreachable, though the daemon did it."""
    job = client.submit(["sleep", "60"], labels=_label())
    proxy = AnswerCutter(int(served.url.rsplit(":", 1)[1]))
    try:
        with Client(proxy.url, served.token) as c:
            with pytest.raises(Unreachable):
                c.cancel(job.id)
        assert len(proxy.requests) == 1
        assert client.wait(job.id, timeout=30).state is JobState.CANCELLED
    finally:
        proxy.close()


def test_submit_outlasts_a_daemon_restart(tmp_path):
    """A submit sent while the daemon is down is tried again with back-off
    until the daemon is back, and makes its job once; a client with no
    tries left says Unreachable."""
    port = _free_port()
    daemon = Twistd(str(tmp_path), INI, listen=f"tcp:{port}:interface=127.0.0.1")
    daemon.start()
    try:
        token = daemon.token
        daemon.stop()
        with Client(daemon.url, token, retries=0) as c:
            with pytest.raises(Unreachable) as caught:
                c.me()
        assert caught.value.url == daemon.url and caught.value.status is None
        restart = threading.Timer(1.5, daemon.start)
        restart.start()
        labels = _label()
        with Client(daemon.url, token, retries=8) as c, _Retries() as retries:
            job = c.submit(["true"], labels=labels)
            restart.join()
            assert [j.id for j in c.jobs(label=labels)] == [job.id]
        assert retries.events
    finally:
        daemon.stop()


def test_a_503_is_tried_again_with_the_same_key():
    """A submit answered 503 (nothing was changed) is sent again after the
    Retry-After the answer gave, with the same Idempotency-Key; after as
    many tries as allowed, the 503 is raised as Unavailable."""
    keys = []
    job = _job_json()

    def answer(request):
        keys.append(request.headers["idempotency-key"])
        if len(keys) < 3:
            return httpx.Response(503, headers={"Retry-After": "0"},
                                  json={"error": {"code": "shutting_down", "message": "stopping",
                                                  "field": None}})
        return httpx.Response(201, content=job)

    http = httpx.Client(transport=httpx.MockTransport(answer))
    with Client("http://d.example", "t", http=http) as c:
        assert c.submit(["true"]).id == "j1"
    assert len(keys) == 3 and len(set(keys)) == 1
    with Client("http://d.example", "t", http=http, retries=1) as c:
        keys.clear()
        with pytest.raises(Unavailable) as caught:
            c.submit(["true"])
    assert (caught.value.status, caught.value.code, len(keys)) == (503, "shutting_down", 2)


def test_follow_log_streams_and_resumes_where_it_was_cut(served, client):
    """follow_log() yields the output as it is written, and a connection cut
    after the first line is resumed at the bytes read: the whole log once."""
    job = client.submit(["sh", "-c", "echo one; sleep 1.5; echo two"], labels=_label())
    pieces = list(client.follow_log(job.id))
    assert b"".join(pieces) == b"one\ntwo\n" and pieces[0] == b"one\n"
    job = client.submit(["sh", "-c", "echo one; sleep 1.5; echo two"], labels=_label())
    proxy = AnswerCutter(int(served.url.rsplit(":", 1)[1]), marker=b"one\n")
    try:
        with Client(proxy.url, served.token) as c:
            assert b"".join(c.follow_log(job.id)) == b"one\ntwo\n"
        assert len(proxy.requests) == 2
        assert b"offset=4" in proxy.requests[1]
    finally:
        proxy.close()


# The Twisted client

@pytest.fixture
def twisted_client(served):
    before = set(reactor.getDelayedCalls())
    c = TwistedClient(served.url, served.token, reactor=reactor)
    yield c
    pytest_twisted.blockon(c.close())
    # Its timeouts, back-offs and idle timers are all gone.
    assert [d for d in reactor.getDelayedCalls() if d not in before and d.active()] == []


@pytest_twisted.ensureDeferred
async def test_twisted_client_submits_waits_and_lists(twisted_client):
    """The Twisted client's Deferreds give what the blocking client returns:
    a submitted job, its end, its log, and the jobs across pages."""
    labels = _label()
    job = await twisted_client.submit(["sh", "-c", "echo hi"], labels=labels)
    assert isinstance(job, JobView)
    assert (await twisted_client.wait(job.id, timeout=30)).state is JobState.SUCCEEDED
    assert await twisted_client.log(job.id) == b"hi\n"
    other = await twisted_client.submit(["true"], labels=labels)
    listed = [j.id async for j in twisted_client.jobs(label=labels, page_size=1)]
    assert listed == [job.id, other.id]
    assert (await twisted_client.wait([job.id, other.id]))[1].state is JobState.SUCCEEDED
    made = await twisted_client.submit(["true"], array=2, labels=labels)
    group = await twisted_client.array(made.jobs[0].array_id, wait=30)
    assert (group.size, group.final, group.succeeded) == (2, True, True)
    assert (await twisted_client.me()).name == "admin"
    assert "default" in await twisted_client.queues()
    assert await twisted_client.workers() == []


@pytest_twisted.ensureDeferred
async def test_twisted_client_refusals_are_typed(twisted_client):
    """A refusal fails the Deferred with the error of its status."""
    with pytest.raises(NotFound):
        await twisted_client.job("no-such-job")
    with pytest.raises(BadRequest) as caught:
        await twisted_client.submit(["true"], queue="no-such-queue")
    assert caught.value.field == "queue"
    job = await twisted_client.submit(["sleep", "60"], labels=_label())
    await twisted_client.cancel(job.id)
    ended = await twisted_client.wait([job.id], timeout=30)
    assert [j.state for j in ended] == [JobState.CANCELLED]
    with pytest.raises(Conflict):
        await twisted_client.cancel(job.id)
    await twisted_client.delete(job.id)


@pytest_twisted.ensureDeferred
async def test_twisted_follow_log_waits_for_a_slow_receiver(twisted_client):
    """follow_log() hands each piece to the receiver in order, waits for the
    Deferred a receiver returns before the next, and fires once the attempt
    has ended."""
    job = await twisted_client.submit(
        ["sh", "-c", "echo one; sleep 1; echo two; echo three"], labels=_label())
    pieces = []
    busy = []

    def received(data):
        assert not busy, "a piece came while the last was still handled"
        busy.append(data)
        pieces.append(data)
        return deferLater(reactor, 0.2, busy.clear)

    assert await twisted_client.follow_log(job.id, received) is None
    assert b"".join(pieces) == b"one\ntwo\nthree\n" and pieces[0] == b"one\n"


def _job_json(**fields):
    job = {"id": "j1", "state": "queued", "name": None, "labels": {}, "created_at":
           "2026-12-07T09:00:00Z", "started_at": None, "finished_at": None, "exit_code": None,
           "result": None, "error": None, "wait_reason": None, "attempts": [], "worker": None,
           "owner": "admin", "command": ["true"]}
    job.update(fields)
    return json.dumps(job).encode()


def test_twisted_submit_backs_off_on_its_reactor_and_keeps_its_key():
    """The Twisted client's back-off after a 503 is timed by its injected
    reactor (nothing is sent again until the Retry-After has passed on it),
    and the submit is sent again with the same Idempotency-Key."""
    keys = []

    class Flaky(Resource):
        isLeaf = True

        def render_POST(self, request):
            keys.append(request.getHeader("idempotency-key"))
            if len(keys) == 1:
                request.setResponseCode(503)
                request.setHeader("retry-after", "5")
                return b'{"error": {"code": "shutting_down", "message": "stopping", "field": null}}'
            request.setResponseCode(201)
            return _job_json()

    clock = Clock()
    stub = StubTreq(Flaky())
    c = TwistedClient("http://d.example", "t", reactor=clock, http=stub)
    d = c.submit(["true"])
    stub.flush()
    assert len(keys) == 1 and not d.called
    clock.advance(4.9)
    stub.flush()
    assert len(keys) == 1 and not d.called
    clock.advance(0.1)
    stub.flush()
    assert len(keys) == 2 and keys[0] == keys[1]
    assert d.result.id == "j1"
    assert clock.getDelayedCalls() == []


# A generated client

def test_a_stock_generator_makes_a_working_client(served, tmp_path):
    """openapi-python-client generates a client from the served document
    (its servers entry relative: the URL it was fetched from) with every
    operation but the worker's raw log upload (an octet-stream body has no
    schema in OpenAPI 3.1, and the generator wants one), and that client
    submits a job and gets it from a real daemon.  Its submission types are
    the schema's oneOf branches (command, task), the other fields passed as
    additional properties: the generator reads a oneOf beside properties as
    a union of the branches alone."""
    with httpx.Client() as http:
        document = http.get(served.url + "/v1/openapi.json").json()
    assert document["servers"][0]["url"] == "/"
    (tmp_path / "openapi.json").write_text(json.dumps(document))
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    made = subprocess.run(
        [os.path.join(BIN, "openapi-python-client"), "generate", "--path", "openapi.json",
         "--meta", "none", "--output-path", "generated_dispatcher"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    said = made.stdout + made.stderr
    assert re.findall(r"WARNING parsing (\S+ \S+)", said) == ["POST /v1/leases/log"], said
    assert "Unable to" not in said, said
    sys.path.insert(0, str(tmp_path))
    try:
        from generated_dispatcher.api.default import get_job, submit_job
        from generated_dispatcher.client import AuthenticatedClient
        from generated_dispatcher.models import JobSubmissionType0, JobView as GeneratedJobView

        generated = AuthenticatedClient(base_url=served.url, token=served.token)
        labels = _label()
        body = JobSubmissionType0.from_dict({"command": ["true"], "labels": labels})
        answer = submit_job.sync_detailed(client=generated, body=body,
                                          idempotency_key=uuid.uuid4().hex)
        assert answer.status_code == 201, answer.content
        assert isinstance(answer.parsed, GeneratedJobView)
        job = get_job.sync(answer.parsed.id, client=generated)
        assert isinstance(job, GeneratedJobView)
        assert job.id == answer.parsed.id and job.labels.to_dict() == labels
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith("generated_dispatcher")]:
            del sys.modules[name]


# Events, against a scripted event stream: the wire as GET /v1/events
# writes it (issue 17's contract), cut and ended where a daemon's would be.

def _sse(event_id, kind, data):
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def _job_event(event_id, state):
    return _sse(event_id, "job", {
        "id": event_id, "at": "2026-12-07T09:00:00Z", "job_id": f"j{event_id}",
        "state": state, "previous": None, "owner": "admin", "queue": "default",
        "name": None, "array_id": None, "batch_id": None, "attempt": None,
        "exit_code": None, "error": None})


class ScriptedEvents:
    """
    An HTTP server on loopback (a thread) that answers each connection's
    request with the next of its scripts: an event stream sent in chunks,
    then either cut (the connection closed without the last chunk, as a
    failed network or a killed daemon leaves it), ended (the last chunk,
    as after a dropped event), or held open until the client leaves.  It
    keeps each request's head.
    """

    def __init__(self, scripts):
        self.scripts = list(scripts)
        self.heads = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while self.scripts:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            chunks, end = self.scripts.pop(0)
            threading.Thread(target=self._serve, args=(conn, chunks, end), daemon=True).start()

    def _serve(self, conn, chunks, end):
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            self.heads.append(head.decode())
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            for chunk in chunks:
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if end == "ended":
                conn.sendall(b"0\r\n\r\n")
                conn.recv(1)  # until the client closes
            elif end == "held":
                conn.recv(1)

    def close(self):
        self.listener.close()


def _scripted():
    first, second = _job_event(1, "queued"), _job_event(2, "running")
    return ScriptedEvents([
        # A heartbeat and two events, split mid-event, then cut.
        ([b": keep-alive\n\n" + first + second[:10], second[10:]], "cut"),
        # The reconnection time, an event, then dropped: the stream ends.
        ([b"retry: 10\n\n" + _job_event(3, "succeeded"),
          b'event: dropped\ndata: {"id": 3, "reason": "too_far_behind"}\n\n'], "ended"),
        ([_sse(4, "worker", {"id": 4, "at": "2026-12-07T09:00:01Z", "worker": "w1",
                             "change": "connected"})], "held"),
    ])


def _check_resumed(server, events):
    assert [(e.id, e.type) for e in events] == [(1, "job"), (2, "job"), (3, "job"), (4, "worker")]
    assert events[2].data.state is JobState.SUCCEEDED and events[3].data.worker == "w1"
    first, *resumed = server.heads
    assert first.startswith("GET /v1/events?type=job&type=worker&after=0 ")
    assert "last-event-id" not in first.lower()
    assert [re.search(r"(?i)last-event-id: (\S+)", h).group(1) for h in resumed] == ["2", "3"]
    assert all("after=" not in h.split("\r\n")[0] for h in resumed)


def test_events_resume_after_a_cut_and_a_drop():
    """events() gives each event typed, skipping heartbeats, and resumes
    after the last event read (Last-Event-ID): after a cut connection and
    after a dropped event ends the stream, with no event lost or twice."""
    import itertools

    server = _scripted()
    try:
        with Client(server.url, "t") as c:
            events = list(itertools.islice(c.events(after=0, type=["job", "worker"]), 4))
        _check_resumed(server, events)
    finally:
        server.close()


@pytest_twisted.ensureDeferred
async def test_twisted_events_resume_after_a_cut_and_a_drop():
    """The Twisted client's events() calls back with the same events, resumed
    the same way, until its Deferred is cancelled."""
    server = _scripted()
    c = TwistedClient(server.url, "t", reactor=reactor)
    events = []
    got_four = Deferred()

    def received(event):
        events.append(event)
        if len(events) == 4:
            got_four.callback(None)

    try:
        following = c.events(received, after=0, type=["job", "worker"])
        await got_four.addTimeout(20, reactor)
        following.cancel()
        with pytest.raises(CancelledError):
            await following
        _check_resumed(server, events)
    finally:
        server.close()
        await c.close()
