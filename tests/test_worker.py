"""
The remote worker: its back-off, leases, heartbeats, logs, results and
shutdown on a test clock against an in-memory dispatcher (StubTreq), its
resource detection and its options.
"""

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import attrs
import msgspec
import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.static import File

from dispatcher.execution._executor import RunningJob
from dispatcher.model._jobs import JobSpec, JobState, Lease, Limits, Outcome
from dispatcher.model._workers import LeaseEnd
from dispatcher.wire._forms import REFUSALS, lease_grant
from dispatcher.wire._json import encode
from dispatcher.wire._types import (
    Error,
    ErrorDetail,
    HeartbeatAnswer,
    HeartbeatRequest,
    LeaseAnswer,
    LeaseRequest,
    LeaseStatus,
    LogWritten,
    ResultsAnswer,
    ResultsRequest,
)
from dispatcher.workers._agent import Backoff, RemoteWorker, WorkerDescription
from dispatcher.workers._client import (
    DispatcherClient,
    DispatcherRefused,
    DispatcherUnavailable,
    LeaseGone,
    LogOffsetMismatch,
)
from dispatcher.execution._host import count_gpus, detect_cpus, detect_gpus, parse_meminfo
from dispatcher.app.worker_tap import Options

from .conftest import TEST_TASKS, as_the_tests_account, sleep

TOKEN = "s3cret-token-0123456789"
URL = "http://dispatcher.test:8080"


# An in-memory dispatcher

@attrs.define
class Call:
    """One request the worker made, answered when the test says so."""

    path: str
    query: dict
    headers: dict
    body: bytes
    at: float
    request: object
    answered: bool = False

    @property
    def json(self):
        return json.loads(self.body)


# What each endpoint takes, as the dispatcher decodes it.
REQUESTS = {
    "/v1/leases": LeaseRequest,
    "/v1/leases/heartbeat": HeartbeatRequest,
    "/v1/leases/results": ResultsRequest,
}


class FakeDispatcher(Resource):
    """Records every POST and holds it open until answered; a JSON body
    must be what the real dispatcher takes there, or the test fails."""

    isLeaf = True

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.calls = []
        self.refused = []

    def render_POST(self, request):
        call = Call(
            request.path.decode(),
            {k.decode(): v[0].decode() for k, v in request.args.items()},
            {k.decode().lower(): v[0].decode()
             for k, v in request.requestHeaders.getAllRawHeaders()},
            request.content.read(),
            self.clock.seconds(),
            request,
        )
        if call.path in REQUESTS:
            try:
                msgspec.json.decode(call.body, type=REQUESTS[call.path])
            except msgspec.ValidationError as e:
                self.refused.append((call.path, str(e)))
        self.calls.append(call)
        # A request the worker gave up on needs no answer.
        request.notifyFinish().addErrback(lambda _: setattr(call, "answered", True))
        return NOT_DONE_YET


class FakeExecutor:
    """Runs nothing: the test ends each job when it wants."""

    kill_grace = 5.0

    def __init__(self):
        self.runs = {}
        self.mark_running = {}
        self.stopped = []
        self.graces = []
        self.deadlines = {}

    def run(self, lease, mark_running, record_process, deadline=None):
        running = RunningJob(lease, Deferred(), deadline=deadline)
        self.runs[lease.job_id] = running
        self.mark_running[lease.job_id] = mark_running
        self.deadlines[lease.job_id] = deadline
        return running

    def set_deadline(self, job_ids, at):
        for job_id in job_ids:
            self.deadlines[job_id] = at

    def stop(self, job_id, grace=None):
        self.stopped.append(job_id)
        self.graces.append(grace)

    def log_path(self, job_id, attempt, stream):
        return f"{job_id}/attempt-{attempt}/{stream}"

    def finish(self, job_id, outcome=Outcome(JobState.SUCCEEDED, exit_code=0)):
        self.runs[job_id].done.callback(outcome)


@pytest.fixture(autouse=True)
def harnesses(monkeypatch):
    """Every Harness a test makes; after the test, none of their fake
    dispatchers may have had a request the real one refuses."""
    made = []
    monkeypatch.setattr(Harness, "made", made, raising=False)
    yield made
    assert [h.dispatcher.refused for h in made if h.dispatcher.refused] == []


class Harness:
    """A RemoteWorker on a Clock, talking to a FakeDispatcher."""

    made = []

    def __init__(self, slots=2, prefetch=0, **kwargs):
        # Each end is reported as it comes (the tests of the gathering of
        # ends, which waits on the clock, give their own).
        kwargs.setdefault("report_gather", 0.0)
        kwargs.setdefault("report_young", 0.0)
        self.made.append(self)
        self.clock = Clock()
        self.dispatcher = FakeDispatcher(self.clock)
        self.stub = StubTreq(self.dispatcher)
        self.client = DispatcherClient(self.stub, URL, TOKEN, self.clock)
        self.executor = FakeExecutor()
        self.logs = {}
        self.description = WorkerDescription(
            "w1", slots, 4.0, 2048, 0, {"site": "a"}, ("add",), prefetch=prefetch)
        self.worker = RemoteWorker(
            self.client, self.executor, self.description, self.clock,
            self.read_chunks, rng=random.Random(3), **kwargs)
        self.reads = 0
        self.lease_seconds = 15.0
        self.heartbeat_seconds = 10.0
        # 0: the answers say nothing of it (an older dispatcher).
        self.fence_seconds = 0.0

    def read_chunks(self, pieces):
        self.reads += 1
        return succeed([self.logs.get(path, b"")[offset:offset + size]
                        for path, offset, size in pieces])

    def pending(self, path=None):
        return [c for c in self.dispatcher.calls
                if not c.answered and (path is None or c.path == path)]

    def one(self, path):
        calls = self.pending(path)
        assert len(calls) == 1, [(c.path, c.body) for c in self.pending()]
        return calls[0]

    def answer(self, call, body, code=200):
        call.answered = True
        request = call.request
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.write(encode(body))
        request.finish()
        self.stub.flush()

    def grant(self, *leases, heartbeat_seconds=5.0, fence_seconds=None):
        # Every later answer keeps the timing this one gives, as the
        # dispatcher's do.
        self.heartbeat_seconds = heartbeat_seconds
        self.answer(self.one("/v1/leases"), LeaseAnswer(
            [lease_grant(lease, lease.token) for lease in leases], self.lease_seconds,
            heartbeat_seconds,
            self.fence_seconds if fence_seconds is None else fence_seconds))

    def beat(self, call, *statuses, code=200):
        """Answer a heartbeat with one status per lease."""
        self.answer(call, HeartbeatAnswer(
            list(statuses), self.lease_seconds, self.heartbeat_seconds,
            self.fence_seconds), code)

    def results(self, call, *statuses, code=200):
        """Answer a report with one status per result."""
        self.answer(call, ResultsAnswer(list(statuses)), code)

    def advance(self, seconds, step=0.01):
        """Move the clock in small steps, flushing the in-memory wire (a
        microsecond more, so that sums of steps reach a call due at the end)."""
        end = self.clock.seconds() + seconds + 1e-6
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(min(step, end - self.clock.seconds()))
            self.stub.flush()


def tok(n):
    """The token of job-n's lease: opaque to the worker, in the form the
    dispatcher gives."""
    return f"{100 + n}." + f"mac{n}".rjust(22, "0")


def lease(n, command=("true",), **spec):
    return Lease(f"job-{n}", 1, tok(n), "w1", 0.0, JobSpec(command=command, **spec))


def current(n):
    """A heartbeat's answer for job-n's lease: still current, renewed."""
    return LeaseStatus(f"job-{n}", tok(n), True, expires_at="2026-11-25T13:00:15Z")


def recorded(n):
    """A report's answer for job-n's result: recorded."""
    return LeaseStatus(f"job-{n}", tok(n), True)


def refused(n, reason, token=None):
    """The answer for a lease of job-n that is no longer current."""
    return LeaseStatus(f"job-{n}", token or tok(n), False, status=409, reason=reason,
                       message=REFUSALS[LeaseEnd(reason)])


def error(code, message, field=None, **extra):
    """An error answer, as the dispatcher writes them."""
    return Error(ErrorDetail(code, message, field, **extra))


def unavailable(h, call):
    h.answer(call, error("shutting_down", "stopping"), code=503)


# Back-off

def test_backoff_doubles_with_jitter_up_to_the_cap():
    """Each delay lies between half and all of 0.5 s doubled per failure,
    capped at 30 s; capped delays still differ, and a reset starts over."""
    backoff = Backoff(rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(12)]
    for n, delay in enumerate(delays):
        ceiling = min(30.0, 0.5 * 2 ** n)
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 30.0
    assert len(set(delays[-4:])) == 4
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_worker_backs_off_with_jitter_while_the_dispatcher_is_down():
    """A worker whose lease requests fail waits longer after each failure
    (with jitter), asks once at a time, and asks at once again after a
    success."""
    h = Harness()
    h.worker.startService()
    gaps = []
    for n in range(7):
        call = h.one("/v1/leases")
        unavailable(h, call)
        assert h.pending("/v1/leases") == []
        while not h.pending("/v1/leases"):
            h.advance(0.01)
        gaps.append(h.one("/v1/leases").at - call.at)
    for n, gap in enumerate(gaps):
        ceiling = min(30.0, 0.5 * 2 ** n)
        assert ceiling / 2 - 0.011 <= gap <= ceiling + 0.011, gaps
    # Jitter: the gaps are not a fixed fraction of their ceilings.
    assert len({round(gap / min(30.0, 0.5 * 2 ** n), 2)
                for n, gap in enumerate(gaps)}) > 1
    # A success resets it: the next failure waits half a second at most.
    h.answer(h.one("/v1/leases"), LeaseAnswer([], 30.0, 10.0))
    h.advance(1.0)
    call = h.one("/v1/leases")
    unavailable(h, call)
    h.advance(0.5)
    assert h.one("/v1/leases").at - call.at <= 0.51


def test_a_refused_token_is_logged_and_retried():
    """A 401 is a DispatcherRefused (which the worker logs as an error) and
    the worker backs off and asks again rather than dying with its jobs."""
    h = Harness()
    h.worker.startService()
    h.answer(h.one("/v1/leases"), error("unauthorized", "wrong token",
                                        "Authorization"), code=401)
    h.advance(0.6)
    assert len(h.pending("/v1/leases")) == 1


# The client

def test_client_sends_the_token_and_the_description():
    """A lease request is a JSON POST to /v1/leases with the bearer token,
    the worker's description, max_jobs, wait and the leases it holds."""
    h = Harness(slots=3)
    h.worker.startService()
    call = h.one("/v1/leases")
    assert call.headers["authorization"] == f"Bearer {TOKEN}"
    assert call.headers["content-type"] == "application/json"
    instance = h.description.instance
    assert len(instance) == 16 and instance != Harness().description.instance
    assert call.json == {
        "worker": {"name": "w1", "slots": 3, "cpus": 4.0, "memory_mb": 2048,
                   "gpus": 0, "labels": {"site": "a"}, "tasks": ["add"],
                   "instance": instance},
        "max_jobs": 3, "wait": 30.0, "held": []}


@pytest.mark.parametrize("base", [
    "http://h:8080", "http://h:8080/", "http://h/prefix", "http://h/prefix/"])
def test_client_urls_keep_a_path_prefix(base):
    """Endpoint URLs go under the base URL, with or without a trailing slash
    or a path of its own."""
    client = DispatcherClient(None, base, TOKEN, Clock())
    prefix = base.rstrip("/")
    assert client.url("v1", "leases").to_text() == prefix + "/v1/leases"


def test_client_maps_connection_errors_and_timeouts():
    """A refused connection and a request with no answer in time are both
    DispatcherUnavailable: the worker retries either."""
    clock = Clock()

    class Refusing:
        def request(self, *args, **kwargs):
            return fail(ConnectionRefusedError())

    class Silent:
        def request(self, *args, **kwargs):
            return Deferred()

    errors = []
    desc = WorkerDescription("w", 1, 1.0, 1, 0).offer()
    DispatcherClient(Refusing(), URL, TOKEN, clock).report(desc, []).addErrback(
        errors.append)
    d = DispatcherClient(Silent(), URL, TOKEN, clock).heartbeat(desc, [])
    d.addErrback(errors.append)
    clock.advance(29)
    assert len(errors) == 1
    clock.advance(2)
    assert [e.type for e in errors] == [DispatcherUnavailable, DispatcherUnavailable]
    assert "refused" in str(errors[0].value).lower()
    assert "no answer within 30 s" in str(errors[1].value)


def test_client_moves_to_the_next_dispatcher_when_one_is_unavailable():
    """A client given several dispatchers sends every request to one; a
    timeout, a refused connection or a 503 from it moves the requests after
    to the next, in turn and back to the first; a refusal of the request
    itself (a 409) or a request that another already moved past moves
    nothing."""
    clock = Clock()
    sent = []
    answers = {}

    class Dispatchers:
        def request(self, method, url, **kwargs):
            host = url.host
            sent.append(host)
            return answers[host]()

    def silent():
        return Deferred()

    def refused():
        return fail(ConnectionRefusedError())

    class Response:
        def __init__(self, code, body):
            self.code, self._body = code, body

        def content(self):
            return succeed(self._body)

    def unavailable():
        return succeed(Response(503, encode(error("store_unavailable", "no database"))))

    def stale():
        return succeed(Response(409, encode(error("stale_lease", "gone", "token"))))

    client = DispatcherClient(Dispatchers(), "http://a:1", TOKEN, clock,
                              ("http://b:2", "http://c:3"))
    desc = WorkerDescription("w", 1, 1.0, 1, 0).offer()
    errors = []
    answers.update(a=silent, b=refused, c=unavailable)
    # Two requests under way at a: one timeout moves on, the other's (a
    # request to a dispatcher already left) does not move again.
    client.heartbeat(desc, [], timeout=5).addErrback(errors.append)
    client.heartbeat(desc, [], timeout=6).addErrback(errors.append)
    clock.advance(5)
    assert client.urls == ["http://b:2", "http://c:3", "http://a:1"]
    clock.advance(1)
    assert client.urls[0] == "http://b:2" and client.moves == 1
    client.heartbeat(desc, []).addErrback(errors.append)
    assert client.urls[0] == "http://c:3"
    client.heartbeat(desc, []).addErrback(errors.append)
    assert client.urls[0] == "http://a:1" and client.moves == 3
    assert sent == ["a", "a", "b", "c"]
    assert all(e.check(DispatcherUnavailable) for e in errors) and len(errors) == 4
    # A dispatcher that answers, even with a refusal, is kept.
    answers["a"] = stale
    client.append_log("job-1", tok(7), "stdout", 0, b"x").addErrback(errors.append)
    assert errors[-1].check(LeaseGone)
    assert client.urls[0] == "http://a:1" and client.moves == 3
    assert not clock.getDelayedCalls()


def test_worker_takes_several_urls(token_file, tmp_path):
    """--url is repeatable: the first is the dispatcher asked first, the
    others follow in order; each must be a URL, none given twice."""
    options = Options()
    options.parseOptions([
        "--url", "http://127.0.0.1:1", "--url", "http://localhost:2/prefix",
        "--token-file", str(token_file), "--slots", "1", "--data-dir",
        str(tmp_path / "data"), "--cpus", "1", "--memory", "64", "--gpus", "0"])
    assert options.settings.url == "http://127.0.0.1:1"
    assert options.settings.other_urls == ("http://localhost:2/prefix",)
    with pytest.raises(usage.UsageError, match="--url http://10.0.0.1:3: http://"):
        Options().parseOptions([
            "--url", "http://127.0.0.1:1", "--url", "http://10.0.0.1:3",
            "--token-file", str(token_file), "--slots", "1"])
    base = ["--token-file", "t", "--slots", "1"]
    options = Options()
    with pytest.raises(usage.UsageError, match="--url: expected"):
        options.parseOptions(["--url", "ftp://x"] + base)
    with pytest.raises(usage.UsageError, match="given twice"):
        Options().parseOptions(["--url", "http://127.0.0.1:1", "--url",
                                "http://127.0.0.1:1"] + base)


def test_client_log_answers():
    """append_log sends raw bytes with its query; a 400 with size is a
    LogOffsetMismatch, a 409 a LeaseGone, a 403 a DispatcherRefused."""
    h = Harness()
    results = []
    for _ in range(4):
        h.client.append_log("job-1", tok(7), "stdout", 5, b"abc").addBoth(results.append)
    calls = h.pending("/v1/leases/log")
    assert calls[0].query == {"job_id": "job-1", "token": tok(7), "stream": "stdout",
                              "offset": "5"}
    assert calls[0].body == b"abc"
    assert calls[0].headers["content-type"] == "application/octet-stream"
    h.answer(calls[0], LogWritten(8))
    h.answer(calls[1], error("offset_past_end", "past the end", "offset", size=2),
             code=400)
    h.answer(calls[2], error("stale_lease", "gone", "token"), code=409)
    h.answer(calls[3], error("workers_disabled", "no"), code=403)
    assert results[0] == 8
    assert results[1].check(LogOffsetMismatch) and results[1].value.size == 2
    assert results[2].check(LeaseGone)
    assert results[3].check(DispatcherRefused) and results[3].value.status == 403



def test_client_refuses_an_answer_the_protocol_does_not_allow():
    """A 200 whose body is not the endpoint's answer (a field missing, a
    lease cut short) is a DispatcherUnavailable that says what was wrong:
    the worker retries it as it would a server error, and never acts on
    half an answer."""
    h = Harness()
    errors = []
    offer = h.description.offer()
    h.client.heartbeat(offer, []).addErrback(errors.append)
    h.client.lease(offer, 1, 0.0).addErrback(errors.append)
    h.answer(h.one("/v1/leases/heartbeat"), {"leases": [], "lease_seconds": 15.0})
    h.answer(h.one("/v1/leases"), {"leases": [{"job_id": "job-1", "token": tok(1)}],
                                   "lease_seconds": 15.0, "heartbeat_seconds": 5.0})
    assert [e.type for e in errors] == [DispatcherUnavailable, DispatcherUnavailable]
    assert "HeartbeatAnswer" in str(errors[0].value)
    assert "heartbeat_seconds" in str(errors[0].value)
    assert "$.leases[0]" in str(errors[1].value)


# Leases

def test_long_poll_is_not_busy_and_several_jobs_come_at_once():
    """The worker holds one lease request open (no polling while it waits),
    starts every job of an answer, and asks only for its free slots."""
    h = Harness(slots=3)
    h.worker.startService()
    h.advance(40, step=1)
    assert len(h.dispatcher.calls) == 1
    h.grant(lease(1), lease(2, command=("echo", "hi"), env={"A": "1"}))
    assert sorted(h.executor.runs) == ["job-1", "job-2"]
    rebuilt = h.executor.runs["job-2"].lease
    assert rebuilt.token == tok(2) and rebuilt.spec.command == ("echo", "hi")
    assert rebuilt.spec.env == {"A": "1"}
    assert h.one("/v1/leases").json["max_jobs"] == 1


def test_a_full_worker_does_not_ask_until_a_slot_is_free():
    """With every slot leased, no lease request goes out; an acknowledged
    result frees the slot and the worker asks again."""
    h = Harness(slots=1)
    h.worker.startService()
    h.grant(lease(1))
    h.advance(2)
    assert h.pending("/v1/leases") == []
    h.executor.finish("job-1")
    h.results(h.one("/v1/leases/results"), recorded(1))
    assert h.one("/v1/leases").json["max_jobs"] == 1


def report_granting(h, call, statuses, *leases, fence_seconds=20.0):
    """Answer a report that asked for work: one status per result, and the
    leases granted."""
    h.answer(call, ResultsAnswer(
        list(statuses), [lease_grant(l, l.token) for l in leases], h.lease_seconds,
        h.heartbeat_seconds, fence_seconds))


def test_a_report_asks_for_every_slot_its_results_free():
    """The report of jobs that ended asks for work in the same request, for
    every slot free once it is recorded, listing the leases held but those it
    ends; no request for work goes meanwhile, and the leases its answer
    grants run at once."""
    h = Harness(slots=3)
    h.worker.startService()
    h.grant(lease(1), lease(2), lease(3))
    h.executor.finish("job-1")
    h.executor.finish("job-2")
    first = h.one("/v1/leases/results")
    # Sent at the first end (report_gather is 0 here); the second waits.
    assert first.json["max_jobs"] == 1
    assert first.json["held"] == [{"job_id": "job-2", "token": tok(2)},
                                  {"job_id": "job-3", "token": tok(3)}]
    report_granting(h, first, [recorded(1)], lease(4))
    second = h.one("/v1/leases/results")
    assert [r["job_id"] for r in second.json["results"]] == ["job-2"]
    assert second.json["max_jobs"] == 1
    assert h.pending("/v1/leases") == []
    assert set(h.executor.runs) == {"job-1", "job-2", "job-3", "job-4"}
    assert h.executor.deadlines["job-4"] is not None
    report_granting(h, second, [recorded(2)], lease(5))
    assert h.pending("/v1/leases") == []
    assert h.worker.free_slots == 0
    assert h.worker.lease_answers == {3: 1, 1: 2}


def test_a_report_answer_that_fills_fewer_slots_opens_a_long_poll():
    """When a report's answer grants fewer leases than it asked for (nothing
    more was queued), the worker waits for work with a long-poll for the
    slots still free; while that poll is open, reports do not ask."""
    h = Harness(slots=3)
    h.worker.startService()
    h.grant(lease(1), lease(2), lease(3))
    for n in (1, 2, 3):
        h.executor.finish(f"job-{n}")
    first = h.one("/v1/leases/results")
    report_granting(h, first, [recorded(1)], lease(4))
    second = h.one("/v1/leases/results")
    assert second.json["max_jobs"] == 2
    report_granting(h, second, [recorded(2), recorded(3)])
    assert h.one("/v1/leases").json["max_jobs"] == 2
    h.executor.finish("job-4")
    third = h.one("/v1/leases/results")
    assert "max_jobs" not in third.json and "held" not in third.json


def test_a_dispatcher_that_refuses_max_jobs_in_a_report_is_asked_apart():
    """A dispatcher older than a report's max_jobs refuses it by name: the
    worker sends the same results again without it, from then on, and asks
    for work with a request of its own, as before."""
    h = Harness(slots=1)
    h.worker.startService()
    h.grant(lease(1))
    h.executor.finish("job-1")
    call = h.one("/v1/leases/results")
    assert call.json["max_jobs"] == 1
    h.answer(call, error("unknown_field", "max_jobs: not a field of this request",
                         "max_jobs"), code=400)
    again = h.one("/v1/leases/results")
    assert "max_jobs" not in again.json and "held" not in again.json
    assert again.json["results"] == call.json["results"]
    h.results(again, recorded(1))
    h.grant(lease(2))
    h.executor.finish("job-2")
    assert "max_jobs" not in h.one("/v1/leases/results").json


def test_the_ends_of_jobs_that_run_together_are_reported_together():
    """A job that ends waits for the others still running, up to the
    gathering time, so that their results go in one report; once none runs
    the report goes at once."""
    h = Harness(slots=3, report_gather=0.001)
    h.worker.startService()
    h.grant(lease(1), lease(2), lease(3))
    h.executor.finish("job-1")
    h.executor.finish("job-2")
    assert h.pending("/v1/leases/results") == []
    h.executor.finish("job-3")
    call = h.one("/v1/leases/results")
    assert [r["job_id"] for r in call.json["results"]] == ["job-1", "job-2", "job-3"]
    assert call.json["max_jobs"] == 3 and call.json["held"] == []
    report_granting(h, call, [recorded(1), recorded(2), recorded(3)], lease(4), lease(5))
    h.executor.finish("job-4")
    assert h.pending("/v1/leases/results") == []
    # job-5 runs on: job-4 waits no longer than the gathering time.
    h.advance(0.001, step=0.0005)
    call = h.one("/v1/leases/results")
    assert [r["job_id"] for r in call.json["results"]] == ["job-4"]


def test_a_slot_freed_beside_young_jobs_is_asked_for_with_their_ends():
    """A slot a report frees and its answer does not fill, while the jobs
    still running all started lately, is not asked for in a request of its
    own: the report of those jobs' ends asks for every slot in one request,
    so that the leases come in one answer, not split in two."""
    h = Harness(slots=8, report_gather=0.001, report_young=0.01)
    h.worker.startService()
    h.grant(*(lease(n) for n in range(1, 9)))
    h.executor.finish("job-1")
    h.advance(0.001, step=0.0005)
    call = h.one("/v1/leases/results")
    assert call.json["max_jobs"] == 1
    report_granting(h, call, [recorded(1)])
    h.advance(0.002, step=0.0005)
    assert h.pending("/v1/leases") == []
    for n in range(2, 9):
        h.executor.finish(f"job-{n}")
    call = h.one("/v1/leases/results")
    assert [r["job_id"] for r in call.json["results"]] == [f"job-{n}" for n in range(2, 9)]
    assert call.json["max_jobs"] == 8
    assert h.pending("/v1/leases") == []


def test_a_young_job_holds_back_a_free_slot_no_longer_than_report_young():
    """A free slot beside a job that runs on is asked for once that job has
    run for report_young, not later."""
    h = Harness(slots=2, report_young=0.01)
    h.worker.startService()
    h.grant(lease(1), lease(2))
    h.advance(0.002, step=0.0005)
    h.executor.finish("job-1")
    report_granting(h, h.one("/v1/leases/results"), [recorded(1)])
    h.advance(0.0075, step=0.0005)
    assert h.pending("/v1/leases") == []
    h.advance(0.0005, step=0.0005)
    assert h.one("/v1/leases").json["max_jobs"] == 1
    assert "job-2" in running_now(h)


def test_a_long_job_does_not_hold_back_the_slot_free_beside_it():
    """A slot freed beside a long job (one that has run past report_young)
    is asked for at once."""
    h = Harness(slots=2, report_young=0.01)
    h.worker.startService()
    h.grant(lease(1), lease(2))
    h.advance(1.0, step=0.05)
    h.executor.finish("job-2")
    report_granting(h, h.one("/v1/leases/results"), [recorded(2)])
    assert h.one("/v1/leases").json["max_jobs"] == 1
    assert "job-1" in running_now(h)


def test_leases_a_report_brings_to_a_stopping_worker_go_back_unstarted():
    """A report that asked for work is answered while the worker stops: the
    leases it grants are not started, and are given back as released."""
    h = Harness(slots=1)
    h.worker.startService()
    h.grant(lease(1))
    h.executor.finish("job-1")
    call = h.one("/v1/leases/results")
    stopped = h.worker.stopService()
    report_granting(h, call, [recorded(1)], lease(2))
    assert "job-2" not in h.executor.runs
    back = h.one("/v1/leases/results")
    assert back.json["results"][0]["job_id"] == "job-2"
    assert back.json["results"][0]["state"] == "released"
    assert "max_jobs" not in back.json
    h.results(back, recorded(2))
    h.advance(1.0)
    assert stopped.called


def test_one_report_answer_frees_all_its_slots_before_the_next_ask():
    """When one answer acknowledges several results, the next lease request
    asks for every slot it freed, not for the first one alone."""
    h = Harness(slots=3)
    h.worker.startService()
    h.grant(lease(1), lease(2), lease(3))
    h.executor.finish("job-1")
    first = h.one("/v1/leases/results")
    h.executor.finish("job-2")
    h.executor.finish("job-3")
    h.results(first, recorded(1))
    # The freed slot is asked for and filled; the worker is full again.
    h.grant(lease(4))
    second = h.one("/v1/leases/results")
    assert [r["job_id"] for r in second.json["results"]] == ["job-2", "job-3"]
    assert h.pending("/v1/leases") == []
    h.results(second, recorded(2), recorded(3))
    assert h.one("/v1/leases").json["max_jobs"] == 2


# Prefetch

def running_now(h):
    """The jobs the fake executor runs now (started and not ended)."""
    return sorted(job_id for job_id, r in h.executor.runs.items() if not r.done.called)


def test_a_prefetching_worker_holds_leases_beyond_its_slots_and_runs_its_slots_alone():
    """With a prefetch, once a short job has ended, a report asks for the
    slots it frees and the prefetch too; the leases beyond the slots wait
    unstarted, in the order granted, and each starts the moment a running
    job ends, before that end is reported: never more jobs run than the
    slots."""
    h = Harness(slots=2, prefetch=2)
    h.worker.startService()
    first = h.one("/v1/leases")
    # No job has ended yet, so none is known short: slots alone.
    assert first.json["max_jobs"] == 2 and first.json["worker"]["prefetch"] == 2
    h.grant(lease(1), lease(2))
    h.executor.finish("job-1")
    report = h.one("/v1/leases/results")
    assert report.json["max_jobs"] == 3
    report_granting(h, report, [recorded(1)], lease(3), lease(4), lease(5))
    assert running_now(h) == ["job-2", "job-3"]
    assert h.worker.free_slots == 0 and len(h.worker.held) == 4
    assert h.pending("/v1/leases") == []
    h.executor.finish("job-2")
    # job-4 started at once, before anything was sent about job-2's end.
    assert running_now(h) == ["job-3", "job-4"]
    report = h.one("/v1/leases/results")
    assert [r["job_id"] for r in report.json["results"]] == ["job-2"]
    assert report.json["max_jobs"] == 1
    assert report.json["held"] == [{"job_id": f"job-{n}", "token": tok(n)} for n in (3, 4, 5)]
    h.executor.finish("job-3")
    assert running_now(h) == ["job-4", "job-5"]
    report_granting(h, report, [recorded(2)], lease(6))
    assert running_now(h) == ["job-4", "job-5"]
    for n in (4, 5, 6):
        h.executor.finish(f"job-{n}")
        assert len(running_now(h)) <= 2
    assert sorted(h.executor.runs) == [f"job-{n}" for n in range(1, 7)]


def test_prefetched_leases_are_renewed_and_start_with_their_renewed_fence():
    """A heartbeat names the prefetched leases too, and renews them; a
    prefetched job starts with its latest fence as its deadline."""
    h = Harness(slots=1, prefetch=1)
    h.fence_seconds = 10.0
    h.worker.startService()
    h.grant(lease(1), heartbeat_seconds=5.0)
    h.executor.finish("job-1")
    report_granting(h, h.one("/v1/leases/results"), [recorded(1)], lease(2), lease(3),
                    fence_seconds=10.0)
    assert running_now(h) == ["job-2"]
    h.advance(5.0)
    beat = h.one("/v1/leases/heartbeat")
    assert [i["job_id"] for i in beat.json["leases"]] == ["job-2", "job-3"]
    h.beat(beat, current(2), current(3))
    renewed = h.executor.deadlines["job-2"]
    assert renewed == pytest.approx(h.clock.seconds() + 10.0, abs=0.02)
    h.advance(1.0)
    h.executor.finish("job-2")
    assert running_now(h) == ["job-3"]
    assert h.executor.deadlines["job-3"] == renewed


def test_a_cancelled_prefetched_lease_is_dropped_unstarted():
    """A heartbeat's answer that a prefetched lease is cancelled drops it:
    its job never starts, nothing is reported for it, nothing is stopped,
    and its place is free at once."""
    h = Harness(slots=1, prefetch=2)
    h.worker.startService()
    h.grant(lease(1))
    h.executor.finish("job-1")
    report_granting(h, h.one("/v1/leases/results"), [recorded(1)],
                    lease(2), lease(3), lease(4))
    assert running_now(h) == ["job-2"] and h.worker.free_slots == 0
    h.advance(h.heartbeat_seconds)
    h.beat(h.one("/v1/leases/heartbeat"), current(2), refused(3, "cancelled"), current(4))
    assert "job-3" not in h.worker.held and h.worker.free_slots == 1
    assert h.executor.stopped == []
    h.executor.finish("job-2")
    assert running_now(h) == ["job-4"]
    assert "job-3" not in h.executor.runs
    results = [r for c in h.dispatcher.calls if c.path == "/v1/leases/results"
               for r in c.json["results"]]
    assert "job-3" not in [r["job_id"] for r in results]


def test_stop_gives_prefetched_leases_back_unstarted():
    """A stopping worker gives its prefetched leases back as released at
    once, unstarted, while its running job gets its grace."""
    h = Harness(slots=1, prefetch=2, grace=30.0)
    h.worker.startService()
    h.grant(lease(1))
    h.executor.finish("job-1")
    report_granting(h, h.one("/v1/leases/results"), [recorded(1)],
                    lease(2), lease(3), lease(4))
    stopped = h.worker.stopService()
    back = h.one("/v1/leases/results")
    assert [(r["job_id"], r["state"]) for r in back.json["results"]] == [
        ("job-3", "released"), ("job-4", "released")]
    assert "max_jobs" not in back.json
    h.results(back, recorded(3), recorded(4))
    assert running_now(h) == ["job-2"] and not stopped.called
    h.executor.finish("job-2")
    h.results(h.one("/v1/leases/results"), recorded(2))
    h.advance(1.0)
    assert stopped.called
    assert sorted(h.executor.runs) == ["job-1", "job-2"]


def test_a_prefetched_lease_whose_fence_passed_is_given_back_unstarted():
    """A prefetched lease whose fence passed while it waited (no heartbeat
    got through) is not started when a slot frees: it is given back."""
    h = Harness(slots=1, prefetch=1)
    h.fence_seconds = 10.0
    h.worker.startService()
    h.grant(lease(1))
    h.executor.finish("job-1")
    report_granting(h, h.one("/v1/leases/results"), [recorded(1)], lease(2), lease(3),
                    fence_seconds=10.0)
    # The heartbeats go unanswered past the fence; job-2 is fenced, then
    # ends.
    h.advance(11.0, step=0.5)
    assert "job-2" in h.executor.stopped
    h.executor.finish("job-2", Outcome(JobState.FAILED, exit_code=-9))
    assert "job-3" not in h.executor.runs
    report = h.one("/v1/leases/results")
    states = {r["job_id"]: r["state"] for r in report.json["results"]}
    assert states["job-3"] == "released"


def test_a_long_job_turns_the_prefetch_off_until_a_short_one_ends():
    """Prefetch is used only while the last job to end ran under
    prefetch_below: after a long one, a report asks for its slots alone."""
    h = Harness(slots=2, prefetch=2, prefetch_below=1.0)
    h.worker.startService()
    h.grant(lease(1), lease(2))
    h.advance(1.5, step=0.5)
    h.executor.finish("job-1")
    report = h.one("/v1/leases/results")
    assert report.json["max_jobs"] == 1
    report_granting(h, report, [recorded(1)], lease(3))
    h.executor.finish("job-3")
    assert h.one("/v1/leases/results").json["max_jobs"] == 3


def test_results_that_came_during_a_report_wait_for_the_jobs_its_answer_started():
    """The results of jobs that ended while a report was under way wait, at
    most the gathering time, for the jobs that report's answer started, and
    go with theirs in one report asking for every place they free: a worker
    of two slots and a prefetch of two exchanges four jobs a round trip."""
    h = Harness(slots=2, prefetch=2, report_gather=0.001)
    h.worker.startService()
    h.grant(lease(1), lease(2))
    h.executor.finish("job-1")
    h.executor.finish("job-2")
    first = h.one("/v1/leases/results")
    assert first.json["max_jobs"] == 4
    report_granting(h, first, [recorded(1), recorded(2)], *[lease(n) for n in (3, 4, 5, 6)])
    for n in (3, 4):
        h.executor.finish(f"job-{n}")
    # job-5 and job-6 started as job-3 and job-4 ended, and run past the
    # gathering time; their report is under way when they end.
    assert running_now(h) == ["job-5", "job-6"]
    h.advance(0.001, step=0.0005)
    second = h.one("/v1/leases/results")
    assert [r["job_id"] for r in second.json["results"]] == ["job-3", "job-4"]
    h.executor.finish("job-5")
    h.executor.finish("job-6")
    report_granting(h, second, [recorded(3), recorded(4)], lease(7), lease(8))
    # job-5's and job-6's results wait for job-7 and job-8.
    assert h.pending("/v1/leases/results") == []
    h.executor.finish("job-7")
    h.executor.finish("job-8")
    third = h.one("/v1/leases/results")
    assert [r["job_id"] for r in third.json["results"]] == [f"job-{n}" for n in (5, 6, 7, 8)]
    assert third.json["max_jobs"] == 4
    # Jobs that run on past the gathering time do not hold them longer.
    report_granting(h, third, [recorded(n) for n in (5, 6, 7, 8)], lease(9), lease(10))
    h.executor.finish("job-9")
    assert h.pending("/v1/leases/results") == []
    h.advance(0.001, step=0.0005)
    assert [r["job_id"] for r in h.one("/v1/leases/results").json["results"]] == ["job-9"]


def test_a_dispatcher_that_does_not_know_prefetch_is_asked_without_it():
    """A dispatcher older than the description's prefetch refuses it by
    name: the worker asks again without it, from then on, and holds no
    lease beyond its slots."""
    h = Harness(slots=2, prefetch=2)
    h.worker.startService()
    call = h.one("/v1/leases")
    h.answer(call, error("unknown_field", "worker.prefetch: unknown field",
                         "worker.prefetch"), code=400)
    again = h.one("/v1/leases")
    assert "prefetch" not in again.json["worker"]
    h.grant(lease(1), lease(2))
    h.executor.finish("job-1")
    report = h.one("/v1/leases/results")
    assert report.json["max_jobs"] == 1 and "prefetch" not in report.json["worker"]


def test_each_lease_request_lists_the_leases_held():
    """Every lease request lists the leases the worker holds, from the
    answer that granted them until their result is acknowledged; after a
    lease request whose answer was lost, the next one lists none of what it
    would have granted."""
    h = Harness(slots=3)
    h.worker.startService()
    assert h.one("/v1/leases").json["held"] == []
    h.grant(lease(1), lease(2))
    assert h.one("/v1/leases").json["held"] == [
        {"job_id": "job-1", "token": tok(1)}, {"job_id": "job-2", "token": tok(2)}]
    # The answer to this one is lost on the way.
    unavailable(h, h.one("/v1/leases"))
    h.advance(0.6)
    h.executor.finish("job-1")
    assert h.one("/v1/leases").json["held"] == [
        {"job_id": "job-1", "token": tok(1)}, {"job_id": "job-2", "token": tok(2)}]
    h.results(h.one("/v1/leases/results"), recorded(1))
    h.answer(h.one("/v1/leases"), LeaseAnswer([], 30.0, 10.0))
    h.advance(1.0)
    assert h.one("/v1/leases").json["held"] == [{"job_id": "job-2", "token": tok(2)}]


def test_a_dispatcher_that_does_not_know_held_is_asked_without_it():
    """A dispatcher from before the held field refuses it as unknown: the
    worker says so once and asks again at once without it."""
    h = Harness()
    h.worker.startService()
    h.answer(h.one("/v1/leases"), error(
        "unknown_field", "held: not a field of this request", "held"), code=400)
    assert "held" not in h.one("/v1/leases").json
    h.grant(lease(1))
    assert "held" not in h.one("/v1/leases").json


def test_an_instant_empty_answer_does_not_spin():
    """An empty answer that comes back at once (it should come only when
    the wait ends) is followed by a pause, not another request at once."""
    h = Harness()
    h.worker.startService()
    h.answer(h.one("/v1/leases"), LeaseAnswer([], 30.0, 10.0))
    assert h.pending("/v1/leases") == []
    h.advance(1.0)
    assert len(h.pending("/v1/leases")) == 1


# Heartbeats

def test_heartbeats_keep_leases_alive_and_tell_a_staged_start_at_once():
    """Heartbeats go every heartbeat_seconds with every held lease; a job
    that starts after staging is told at once with running: true, and the
    flag is dropped once a heartbeat carrying it is acknowledged."""
    h = Harness()
    h.worker.startService()
    h.grant(lease(1), lease(2), heartbeat_seconds=5.0)
    h.advance(4.9)
    assert h.pending("/v1/leases/heartbeat") == []
    h.advance(0.2)
    beat = h.one("/v1/leases/heartbeat")
    assert beat.json["worker"]["name"] == "w1"
    assert beat.json["leases"] == [{"job_id": "job-1", "token": tok(1)},
                                   {"job_id": "job-2", "token": tok(2)}]
    h.beat(beat, current(1), current(2))
    # job-1 finished staging: the dispatcher hears of it now, not in 5 s.
    h.executor.mark_running["job-1"](h.executor.runs["job-1"].lease)
    beat = h.one("/v1/leases/heartbeat")
    assert beat.json["leases"][0] == {"job_id": "job-1", "token": tok(1), "running": True}
    # That one fails; the next still says running.
    unavailable(h, beat)
    h.advance(0.5)
    beat = h.one("/v1/leases/heartbeat")
    assert beat.json["leases"][0]["running"] is True
    h.beat(beat, current(1), current(2))
    h.advance(5.0)
    beat = h.one("/v1/leases/heartbeat")
    assert "running" not in beat.json["leases"][0]


def test_heartbeat_retries_never_wait_longer_than_a_period():
    """While the dispatcher is down, heartbeats back off but never past
    heartbeat_seconds, so a dispatcher that comes back hears from the worker
    before its leases run out."""
    h = Harness()
    # Long enough that the job is not fenced while the dispatcher is down.
    h.lease_seconds = 60.0
    h.worker.startService()
    h.grant(lease(1), heartbeat_seconds=2.0)
    h.advance(2.0)
    last = None
    for _ in range(10):
        call = h.one("/v1/leases/heartbeat")
        if last is not None:
            assert call.at - last <= 2.0 + 0.011
        last = call.at
        unavailable(h, call)
        while not h.pending("/v1/leases/heartbeat"):
            h.advance(0.05, step=0.05)


def test_a_refused_heartbeat_item_stops_the_job_and_drops_its_result():
    """On ok: false the job is stopped and its lease forgotten: no more
    heartbeats, logs or results for it, and its slot comes back once it has
    stopped."""
    h = Harness(slots=2)
    h.worker.startService()
    h.grant(lease(1), lease(2))
    h.advance(5.0)
    h.beat(h.one("/v1/leases/heartbeat"), refused(1, "cancelled"), current(2))
    assert h.executor.stopped == ["job-1"]
    # Its slot is still taken while it stops.
    assert h.pending("/v1/leases") == []
    h.logs["job-1/attempt-1/stdout"] = b"bye\n"
    h.executor.finish("job-1", Outcome(JobState.FAILED, exit_code=-15, stopped=True))
    assert h.one("/v1/leases").json["max_jobs"] == 1
    h.advance(5.0)
    beat = h.one("/v1/leases/heartbeat")
    assert beat.json["leases"] == [{"job_id": "job-2", "token": tok(2)}]
    h.beat(beat, current(2))
    h.advance(30, step=0.5)
    assert h.pending("/v1/leases/results") == []
    assert h.pending("/v1/leases/log") == []
    assert all(c.query.get("job_id") != "job-1" for c in h.dispatcher.calls)


def test_a_refused_item_for_another_token_changes_nothing():
    """An ok: false for a token the worker does not hold (an older lease of
    the same job, say) changes nothing."""
    h = Harness()
    h.worker.startService()
    h.grant(lease(1))
    h.advance(5.0)
    h.beat(h.one("/v1/leases/heartbeat"), refused(1, "superseded", token=tok(99)))
    assert h.executor.stopped == []
    assert "job-1" in h.worker.held


# Logs and results

def test_logs_go_each_heartbeat_and_before_the_result():
    """A running job's new output is shipped with each heartbeat from where
    the dispatcher's copy ends; at the end, the rest of both streams goes
    before the result."""
    h = Harness()
    h.worker.startService()
    h.grant(lease(1))
    h.logs["job-1/attempt-1/stdout"] = b"hello\n"
    h.advance(5.0)
    log = h.one("/v1/leases/log")
    assert (log.query["stream"], log.query["offset"], log.body) == ("stdout", "0", b"hello\n")
    h.answer(log, LogWritten(6))
    h.beat(h.one("/v1/leases/heartbeat"), current(1))
    h.logs["job-1/attempt-1/stdout"] += b"world\n"
    h.logs["job-1/attempt-1/stderr"] = b"warn\n"
    h.executor.finish("job-1")
    log = h.one("/v1/leases/log")
    assert (log.query["stream"], log.query["offset"], log.body) == ("stdout", "6", b"world\n")
    assert h.pending("/v1/leases/results") == []
    h.answer(log, LogWritten(12))
    log = h.one("/v1/leases/log")
    assert (log.query["stream"], log.query["offset"], log.body) == ("stderr", "0", b"warn\n")
    h.answer(log, LogWritten(5))
    report = h.one("/v1/leases/results")
    assert report.json["results"] == [{
        "job_id": "job-1", "token": tok(1), "state": "succeeded", "exit_code": 0,
        "result": None, "error": None, "stopped": False}]


def test_a_result_says_its_limits_and_cut_log_unless_the_dispatcher_predates_them():
    """A command's result carries the limits it ran under and the streams
    of its log that were cut; a dispatcher from before those fields refuses
    them as unknown, and the worker says so once and reports again without
    them, as it does from then on."""
    h = Harness(slots=2)
    h.worker.startService()
    h.grant(lease(1), lease(2))
    limits = Limits(512, 4096, True)
    h.executor.finish("job-1", Outcome(JobState.FAILED, exit_code=-9, error="out of memory",
                                       limits=limits, log_cut=("stderr",)))
    report = h.one("/v1/leases/results")
    assert report.json["results"][0]["limits"] == {
        "memory_mb": 512, "processes": 4096, "enforced": True}
    assert report.json["results"][0]["log_cut"] == ["stderr"]
    h.answer(report, error(
        "unknown_field", "results[0].limits: unknown field", "results[0].limits"), code=400)
    again = h.one("/v1/leases/results")
    assert "limits" not in again.json["results"][0]
    assert "log_cut" not in again.json["results"][0]
    h.results(again, recorded(1))
    h.executor.finish("job-2", Outcome(JobState.SUCCEEDED, exit_code=0, limits=limits))
    assert "limits" not in h.one("/v1/leases/results").json["results"][0]


def test_a_job_without_output_reads_both_streams_in_one_trip():
    """At a job's end both streams are read off the reactor thread in one
    trip; with nothing in them the result goes at once."""
    h = Harness()
    h.worker.startService()
    h.grant(lease(1))
    before = h.reads
    h.executor.finish("job-1")
    assert h.reads - before == 1
    assert h.pending("/v1/leases/log") == []
    report = h.one("/v1/leases/results")
    assert report.json["results"][0]["state"] == "succeeded"


def test_a_log_offset_past_the_end_is_resent_from_the_dispatchers_size():
    """A 400 with size (the dispatcher lost the end of the stream, say after
    a restart) makes the worker resend from that size."""
    h = Harness()
    h.worker.startService()
    h.grant(lease(1))
    h.logs["job-1/attempt-1/stdout"] = b"abcdef"
    h.advance(5.0)
    h.answer(h.one("/v1/leases/log"), LogWritten(6))
    h.logs["job-1/attempt-1/stdout"] += b"ghi"
    h.executor.finish("job-1")
    log = h.one("/v1/leases/log")
    assert log.query["offset"] == "6"
    h.answer(log, error("offset_past_end", "offset past the end", "offset", size=2),
             code=400)
    log = h.one("/v1/leases/log")
    assert (log.query["offset"], log.body) == ("2", b"cdefghi")


def test_results_are_kept_until_acknowledged_and_sent_together():
    """Results that could not be delivered are retried with back-off; those
    that pile up meanwhile go in one request; an acknowledged or refused
    result is never sent again, one the answer does not mention is."""
    h = Harness(slots=3)
    h.worker.startService()
    h.grant(lease(1), lease(2), lease(3))
    h.executor.finish("job-1")
    first = h.one("/v1/leases/results")
    assert [r["job_id"] for r in first.json["results"]] == ["job-1"]
    h.executor.finish("job-2", Outcome(JobState.FAILED, exit_code=3,
                                       error="exited with code 3"))
    h.executor.finish("job-3", Outcome(JobState.SUCCEEDED, result={"n": 1}))
    unavailable(h, first)
    h.advance(0.5)
    again = h.one("/v1/leases/results")
    assert [r["job_id"] for r in again.json["results"]] == ["job-1", "job-2", "job-3"]
    assert again.json["results"][1]["exit_code"] == 3
    assert again.json["results"][2]["result"] == {"n": 1}
    h.results(again, recorded(1), refused(2, "expired"))
    last = h.one("/v1/leases/results")
    assert [r["job_id"] for r in last.json["results"]] == ["job-3"]
    h.results(last, recorded(3))
    h.advance(60, step=1)
    assert h.pending("/v1/leases/results") == []
    assert h.worker.held == {}


def test_a_heartbeat_saying_reported_acknowledges_a_result():
    """When a heartbeat's answer says a lease's result is already recorded
    (its report's own answer is still on the way), the result counts as
    acknowledged: its slot is free and it is not sent again."""
    h = Harness(slots=1)
    h.worker.startService()
    h.grant(lease(1), heartbeat_seconds=5.0)
    h.executor.finish("job-1")
    report = h.one("/v1/leases/results")
    h.advance(5.0)
    h.beat(h.one("/v1/leases/heartbeat"), refused(1, "reported"))
    assert h.worker.held == {}
    # The report under way asked for work for the slot: no other request
    # for work goes until it is answered or given up on.
    assert report.json["max_jobs"] == 1
    assert h.pending("/v1/leases") == []
    unavailable(h, report)
    assert h.one("/v1/leases").json["max_jobs"] == 1
    h.advance(30, step=0.5)
    assert h.pending("/v1/leases/results") == []


def test_a_result_that_cannot_be_written_fails_its_job_alone():
    """A result that cannot be written as JSON (a task returned an object)
    is replaced by a failed result saying why, and goes with the others,
    which are reported as they are: one bad result never holds up the
    reports of the jobs beside it or after it."""
    h = Harness(slots=3)
    h.worker.startService()
    h.grant(lease(1), lease(2), lease(3))
    h.executor.finish("job-1")
    first = h.one("/v1/leases/results")
    h.executor.finish("job-2", Outcome(JobState.SUCCEEDED, result={"x": object()}))
    h.executor.finish("job-3", Outcome(JobState.SUCCEEDED, result={"n": 3}))
    unavailable(h, first)
    h.advance(0.5)
    again = h.one("/v1/leases/results")
    items = {r["job_id"]: r for r in again.json["results"]}
    assert list(items) == ["job-1", "job-2", "job-3"]
    assert items["job-1"]["state"] == "succeeded"
    assert items["job-3"]["state"] == "succeeded" and items["job-3"]["result"] == {"n": 3}
    assert items["job-2"]["state"] == "failed"
    assert items["job-2"].get("result") is None
    assert items["job-2"]["error"].startswith(
        "the worker could not send the job's result: TypeError")
    h.results(again, recorded(1), recorded(2), recorded(3))
    assert h.worker.held == {}
    # The slots are free again: one request for all three.
    assert h.one("/v1/leases").json["max_jobs"] == 3


def test_a_result_the_dispatcher_refuses_by_its_field_fails_its_job_alone():
    """A report refused with a 400 naming one result's field (a value the
    dispatcher does not store) is sent again at once with that result
    replaced by a failed one quoting the refusal, the others unchanged; a
    replacement refused again is dropped rather than retried for ever."""
    h = Harness(slots=3)
    h.worker.startService()
    h.grant(lease(1), lease(2), lease(3))
    h.executor.finish("job-1")
    first = h.one("/v1/leases/results")
    h.executor.finish("job-2", Outcome(JobState.SUCCEEDED, result={"big": 10 ** 30}))
    h.executor.finish("job-3", Outcome(JobState.FAILED, exit_code=1, error="exited with code 1"))
    unavailable(h, first)
    h.advance(0.5)
    again = h.one("/v1/leases/results")
    assert [r["job_id"] for r in again.json["results"]] == ["job-1", "job-2", "job-3"]
    h.answer(again, error("invalid_value", "an integer beyond 64 bits is not stored",
                          "results[1].result"), code=400)
    # No back-off: the request that was refused is not the one sent next.
    third = h.one("/v1/leases/results")
    items = [(r["job_id"], r["state"], r.get("result"), r.get("error"))
             for r in third.json["results"]]
    assert items[0] == ("job-1", "succeeded", None, None)
    assert items[2] == ("job-3", "failed", None, "exited with code 1")
    assert items[1][:3] == ("job-2", "failed", None)
    assert "the dispatcher refused it: 400 invalid_value: an integer beyond 64 bits" in items[1][3]
    h.answer(third, error("invalid_value", "still refused", "results[1].error"), code=400)
    fourth = h.one("/v1/leases/results")
    assert [r["job_id"] for r in fourth.json["results"]] == ["job-1", "job-3"]
    h.results(fourth, recorded(1), recorded(3))
    assert h.worker.held == {}


def test_results_refused_as_a_whole_are_dropped():
    """A 409 answer (every item refused) is read item by item like a 200:
    the refused results are dropped, not retried."""
    h = Harness()
    h.worker.startService()
    h.grant(lease(1))
    h.executor.finish("job-1")
    h.results(h.one("/v1/leases/results"), refused(1, "superseded"), code=409)
    h.advance(60, step=1)
    assert h.pending("/v1/leases/results") == []
    assert h.worker.held == {}


# Stopping

def test_stop_gives_running_jobs_a_grace_then_releases_them():
    """A stopping worker asks for nothing more, keeps heartbeating, reports
    the jobs that end within the grace, stops the others after it, ships
    their logs and gives them back as released (their attempt unspent)."""
    h = Harness(slots=3, grace=20.0)
    # A lease long enough that the unanswered heartbeats below do not
    # reach job-2's fence.
    h.lease_seconds = 60.0
    h.worker.startService()
    h.grant(lease(1), lease(2))
    poll = h.one("/v1/leases")
    stopped = h.worker.stopService()
    h.stub.flush()
    assert not stopped.called
    # The open lease request is given up (the dispatcher gives back what it
    # would have granted on it).
    assert poll.answered
    h.advance(5.0)
    h.beat(h.one("/v1/leases/heartbeat"), current(1), current(2))
    h.executor.finish("job-1")
    h.results(h.one("/v1/leases/results"), recorded(1))
    assert h.executor.stopped == []
    h.advance(15.0, step=0.5)
    for beat in h.pending("/v1/leases/heartbeat"):
        h.beat(beat, current(2))
    assert h.executor.stopped == ["job-2"]
    h.logs["job-2/attempt-1/stderr"] = b"Terminated\n"
    h.executor.finish("job-2", Outcome(JobState.FAILED, exit_code=-15, stopped=True))
    # Its last output goes before the worker stops.
    assert not stopped.called
    h.answer(h.one("/v1/leases/log"), LogWritten(11))
    assert not stopped.called
    release = h.one("/v1/leases/results")
    assert [(r["job_id"], r["state"]) for r in release.json["results"]] == [
        ("job-2", "released")]
    h.results(release, recorded(2))
    assert stopped.called
    later = h.dispatcher.calls[h.dispatcher.calls.index(poll) + 1:]
    assert [c for c in later if c.path == "/v1/leases"] == []
    assert h.clock.getDelayedCalls() == []


def test_a_job_that_succeeds_as_the_stop_reaches_it_is_reported():
    """A job stopped at the end of the grace that ends in success all the
    same (it finished before the signal landed) keeps its success: its
    result is reported, and not as stopped."""
    h = Harness(grace=1.0)
    h.worker.startService()
    h.grant(lease(1))
    stopped = h.worker.stopService()
    h.advance(1.0)
    assert h.executor.stopped == ["job-1"]
    h.executor.finish("job-1", Outcome(JobState.SUCCEEDED, exit_code=0, stopped=True))
    report = h.one("/v1/leases/results")
    assert report.json["results"][0]["state"] == "succeeded"
    assert report.json["results"][0]["stopped"] is False
    h.results(report, recorded(1))
    assert stopped.called


def test_stop_without_jobs_is_immediate_and_leaves_no_timers():
    """An idle worker stops at once: the open lease request is given up and
    nothing is left on the clock."""
    h = Harness()
    h.worker.startService()
    unavailable(h, h.one("/v1/leases"))
    stopped = h.worker.stopService()
    assert stopped.called
    assert h.clock.getDelayedCalls() == []


def test_stop_waits_a_bounded_time_for_unacknowledged_results():
    """Results not yet acknowledged get flush_seconds of retries at stop,
    then the worker stops all the same."""
    h = Harness(flush_seconds=10.0)
    h.worker.startService()
    h.grant(lease(1))
    h.executor.finish("job-1")
    unavailable(h, h.one("/v1/leases/results"))
    stopped = h.worker.stopService()
    h.advance(9.0, step=0.25)
    for call in h.pending("/v1/leases/results"):
        unavailable(h, call)
    assert not stopped.called
    h.advance(1.5, step=0.25)
    for call in h.pending():
        unavailable(h, call)
    assert stopped.called
    assert h.clock.getDelayedCalls() == []


# What the host offers

MEMINFO = """\
MemTotal:       16301012 kB
MemFree:         1000000 kB
MemAvailable:    8000000 kB
"""

NVIDIA_SMI = """\
GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-1)
  MIG 1g.5gb      Device  0: (UUID: MIG-1)
  MIG 1g.5gb      Device  1: (UUID: MIG-2)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-2)
"""


def test_memory_is_read_from_meminfo_in_mib():
    """MemTotal in kB becomes MiB; a text without it is an error."""
    assert parse_meminfo(MEMINFO) == 16301012 // 1024
    with pytest.raises(ValueError, match="no MemTotal"):
        parse_meminfo("MemFree: 1 kB\n")
    with pytest.raises(ValueError, match="cannot read"):
        parse_meminfo("MemTotal: lots\n")


def test_gpus_are_counted_from_nvidia_smi():
    """nvidia-smi -L lists one GPU per 'GPU N:' line (MIG lines are parts);
    no nvidia-smi, or one that fails, means no GPUs."""
    assert count_gpus(NVIDIA_SMI) == 2
    assert detect_gpus(which=lambda name: None) == 0

    def run(argv, **kwargs):
        assert argv == ["/usr/bin/nvidia-smi", "-L"]
        return subprocess.CompletedProcess(argv, 0, NVIDIA_SMI, "")

    assert detect_gpus(which=lambda name: "/usr/bin/nvidia-smi", run=run) == 2

    def broken(argv, **kwargs):
        return subprocess.CompletedProcess(argv, 9, "", "NVIDIA-SMI has failed")

    assert detect_gpus(which=lambda name: "/usr/bin/nvidia-smi", run=broken) == 0


def test_cpus_are_the_affinity_mask():
    """The CPUs offered are those the process may run on."""
    assert detect_cpus(lambda pid: {0, 2, 5}) == 3
    assert detect_cpus() >= 1


# Options

@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)  # one others may read is refused
    return str(path)


def parse(*args):
    options = Options()
    options.parseOptions(list(args))
    return options


def test_options_build_the_settings(token_file, tmp_path):
    """Given options are used as they are, the others detected; the config
    file's [tasks] and [fetch] are read and it needs no daemon section."""
    ini = tmp_path / "worker.ini"
    ini.write_text("[tasks]\nadd = tests.tasks:add\n\n[fetch]\ntimeout = 7\n")
    options = parse("--url", "https://10.0.0.1:8443", "--token-file", token_file,
                    "--slots", "3", "--config", str(ini), "--name", "node7",
                    "--cpus", "2.5", "--memory", "1000", "--gpus", "1",
                    "--label", "site=a", "--label", "disk=ssd",
                    "--data-dir", str(tmp_path / "wd"))
    settings = options.settings
    assert settings.token == TOKEN
    assert settings.url == "https://10.0.0.1:8443"
    # The prefetch is as many as the slots unless given.
    assert settings.description == WorkerDescription(
        "node7", 3, 2.5, 1000, 1, {"site": "a", "disk": "ssd"}, ("add",), prefetch=3)
    assert settings.config.fetch.timeout == 7
    assert settings.data_dir == str(tmp_path / "wd")
    detected = parse("--url", "https://h", "--token-file", token_file,
                     "--slots", "1").settings
    assert detected.description.cpus >= 1
    assert detected.description.memory_mb > 0
    assert detected.description.name.endswith(f"-{__import__('os').getpid()}")
    # Made absolute (the spawner helper works from /).
    assert detected.data_dir == os.path.abspath("dispatcher-worker-data")


def test_slurm_environment_gives_the_jobs_the_workers_slurm_variables(
        token_file, monkeypatch):
    """--slurm-environment gives each command job the SLURM_* variables of
    the worker's environment, and no other of its variables; without it
    the jobs get none of them."""
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("NOT_SLURM_JOB_ID", "x")
    base = ["--url", "https://h", "--token-file", token_file, "--slots", "1"]
    assert parse(*base).settings.job_environment == {}
    assert parse(*base, "--one-job", "--slurm-environment").settings.job_environment == {
        "SLURM_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "3"}


def test_prefetch_is_given_or_as_many_as_the_slots_and_a_bad_one_is_refused(token_file):
    """--prefetch sets the leases held beyond the slots (0: none), as many
    as the slots by default; a negative or non-integer one is a usage error
    naming the option."""
    base = ["--url", "https://h", "--token-file", token_file, "--slots", "4"]
    assert parse(*base).settings.description.prefetch == 4
    assert parse(*base, "--prefetch", "0").settings.description.prefetch == 0
    assert parse(*base, "--prefetch", "16").settings.description.prefetch == 16
    for bad in ("-1", "x", "1.5", "10001"):
        with pytest.raises(usage.UsageError, match="--prefetch"):
            parse(*base, "--prefetch", bad)


def test_keep_days_default_to_the_configs_retention_and_take_zero_and_none(
        token_file, tmp_path):
    """--keep-days is the [retention] finished_days of --config unless
    given (7 days without one); 0 (at once) and none (for ever) are
    taken."""
    base = ["--url", "https://h", "--token-file", token_file, "--slots", "1"]
    assert parse(*base).settings.keep_seconds == 7 * 86400
    ini = tmp_path / "worker.ini"
    ini.write_text("[retention]\nfinished_days = 0.5\n")
    assert parse(*base, "--config", str(ini)).settings.keep_seconds == 43200
    ini.write_text("[retention]\nfinished_days = none\n")
    assert parse(*base, "--config", str(ini)).settings.keep_seconds is None
    assert parse(*base, "--config", str(ini), "--keep-days", "2").settings.keep_seconds \
        == 2 * 86400
    assert parse(*base, "--keep-days", "0").settings.keep_seconds == 0
    assert parse(*base, "--keep-days", "None").settings.keep_seconds is None


def test_log_level_defaults_to_the_configs_and_takes_the_option(token_file, tmp_path):
    """The worker's log level is --log-level, else [log] level of --config,
    else info."""
    base = ["--url", "https://h", "--token-file", token_file, "--slots", "1"]
    assert parse(*base).settings.log_level == "info"
    ini = tmp_path / "worker.ini"
    ini.write_text("[log]\nlevel = warn\n")
    assert parse(*base, "--config", str(ini)).settings.log_level == "warn"
    assert parse(*base, "--config", str(ini), "--log-level", "debug").settings.log_level \
        == "debug"


@pytest.mark.parametrize("args, message", [
    (["--url", "https://h", "--token-file", "TOKEN", "--slots", "1", "--keep-days", "-1"],
     "--keep-days: expected a number of days of at least 0"),
    (["--url", "https://h", "--token-file", "TOKEN", "--slots", "1", "--keep-days", "week"],
     "--keep-days: expected a number of days of at least 0"),
    ([], "--url is required"),
    (["--url", "https://h"], "--token-file is required"),
    (["--url", "https://h", "--token-file", "TOKEN"], "--slots is required"),
    (["--url", "ftp://h", "--token-file", "TOKEN", "--slots", "1"],
     "--url: expected the dispatcher's http:// or https:// URL"),
    (["--url", "https://h", "--token-file", "TOKEN", "--slots", "0"],
     "--slots: expected an integer of at least 1, not '0'"),
    (["--url", "https://h", "--token-file", "TOKEN", "--slots", "two"],
     "--slots: expected an integer of at least 1, not 'two'"),
    (["--url", "https://h", "--token-file", "TOKEN", "--slots", "1", "--memory", "1.5G"],
     "--memory: expected an integer number of MiB of at least 1, not '1.5G'"),
    (["--url", "https://h", "--token-file", "TOKEN", "--slots", "1", "--cpus", "0"],
     "--cpus: expected a number of CPUs above 0, not '0'"),
    (["--url", "https://h", "--token-file", "TOKEN", "--slots", "1", "--gpus", "-1"],
     "--gpus: expected an integer of at least 0, not '-1'"),
    (["--url", "https://h", "--token-file", "TOKEN", "--slots", "1", "--label", "site"],
     "--label: expected KEY=VALUE, not 'site'"),
    (["--url", "https://h", "--token-file", "TOKEN", "--slots", "1",
      "--label", "a=1", "--label", "a=2"], "--label: a is given twice"),
    (["--url", "https://h", "--token-file", "/nonexistent/token", "--slots", "1"],
     "--token-file /nonexistent/token: cannot read the token file: No such file or directory"),
    (["--url", "https://h", "--token-file", "TOKEN", "--slots", "1", "--log-level", "loud"],
     "--log-level: expected one of debug, info, warn, error, critical, not 'loud'"),
])
def test_option_errors_say_what_is_wrong(token_file, args, message):
    """Each mistake is a UsageError naming the option, the value and what
    is allowed."""
    args = [token_file if a == "TOKEN" else a for a in args]
    with pytest.raises(usage.UsageError) as e:
        parse(*args)
    assert str(e.value).startswith(message)


def test_an_empty_token_file_and_a_bad_config_are_refused(tmp_path, token_file):
    """An empty token file, and a config file with a wrong key, are errors
    naming the file (and the section and key)."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(usage.UsageError, match="at least 16 characters"):
        parse("--url", "https://h", "--token-file", str(empty), "--slots", "1")
    ini = tmp_path / "bad.ini"
    ini.write_text("[fetch]\ntimeout = soon\n")
    with pytest.raises(usage.UsageError) as e:
        parse("--url", "https://h", "--token-file", token_file, "--slots", "1",
              "--config", str(ini))
    assert str(e.value).startswith(f"{ini}: [fetch] timeout = 'soon': expected")


# Self-fencing

class FenceClock:
    """The worker's fence clock, moved by the test apart from the reactor's
    Clock: a worker process frozen for a while finds it later on waking,
    while its timers have not run yet."""

    def __init__(self, clock):
        self.clock = clock
        self.frozen_for = 0.0

    def __call__(self):
        return self.clock.seconds() + self.frozen_for


def fencing_harness(**kwargs):
    """A Harness whose dispatcher gives 15 s leases and a 5 s fence margin,
    and whose worker reads its fence off a FenceClock."""
    fence_clock = FenceClock(None)
    h = Harness(fence_clock=fence_clock, **kwargs)
    fence_clock.clock = h.clock
    h.fence_clock = fence_clock
    h.fence_seconds = 10.0
    return h


def test_a_worker_that_hears_nothing_stops_its_job_before_its_lease_can_expire():
    """A job whose lease no heartbeat has renewed for fence_seconds, counted
    from when the last acknowledged heartbeat was SENT, gets SIGTERM a short
    grace before that and is killed at it (the spawner helper holds the same
    deadline); its lease is renewed no more, and its result says why."""
    h = fencing_harness()
    h.worker.startService()
    h.grant(lease(1))
    # Granted on a request sent at 0: the helper kills it at 10 unless renewed.
    assert h.executor.deadlines["job-1"] == 10.0
    h.advance(5.0)
    beat = h.one("/v1/leases/heartbeat")
    h.advance(1.0)
    h.beat(beat, current(1))
    # Sent at 5, answered at 6: renewed to 5 + 10, not 6 + 10.
    assert h.executor.deadlines["job-1"] == pytest.approx(15.0)
    # From here the dispatcher cannot be reached.
    h.advance(5.0)
    unavailable(h, h.one("/v1/leases/heartbeat"))
    # SIGTERM comes 2.5 s before the fence (half of what lies between the
    # next heartbeat and the fence), SIGKILL at the fence.
    h.advance(1.4)
    assert h.executor.stopped == []
    h.advance(0.2)
    assert h.executor.stopped == ["job-1"]
    assert h.executor.graces == [pytest.approx(2.5, abs=0.02)]
    fenced_at = h.clock.seconds()
    h.executor.finish("job-1", Outcome(JobState.FAILED, exit_code=-9))
    report = h.one("/v1/leases/results")
    (item,) = report.json["results"]
    assert (item["job_id"], item["state"], item["exit_code"]) == ("job-1", "failed", -9)
    assert item["error"].startswith(
        "stopped by its worker: no heartbeat was acknowledged for 10 s")
    h.results(report, refused(1, "expired"))
    # Nothing renews it any more, and its slot is free again.
    h.advance(20, step=0.5)
    assert all("job-1" not in c.body.decode() for c in h.dispatcher.calls
               if c.path == "/v1/leases/heartbeat" and c.at > fenced_at)
    assert h.worker.free_slots == 2


def test_heartbeats_that_get_through_keep_the_fence_away():
    """A worker whose heartbeats are acknowledged never stops its job, and
    one late heartbeat, retried in time, does not either."""
    h = fencing_harness()
    h.worker.startService()
    h.grant(lease(1))
    for _ in range(6):
        h.advance(5.0)
        h.beat(h.one("/v1/leases/heartbeat"), current(1))
    # One heartbeat fails; the retry, within the period, gets through.
    h.advance(5.0)
    unavailable(h, h.one("/v1/leases/heartbeat"))
    h.advance(2.0)
    h.beat(h.one("/v1/leases/heartbeat"), current(1))
    h.advance(5.0)
    h.beat(h.one("/v1/leases/heartbeat"), current(1))
    assert h.executor.stopped == []
    h.executor.finish("job-1")
    h.results(h.one("/v1/leases/results"), recorded(1))
    h.worker.stopService()
    assert h.clock.getDelayedCalls() == []


def test_a_heartbeat_lost_on_its_connection_is_sent_again_within_a_period():
    """A heartbeat that gets no answer (its connection silently broke: a
    partition healed, a proxy dropped it) is given up after a heartbeat
    period and sent again, so the next one renews the lease before the
    fence; waiting the whole request timeout would fence a job whose
    dispatcher is reachable again."""
    h = fencing_harness()
    h.worker.startService()
    h.grant(lease(1), heartbeat_seconds=4.0)
    h.advance(4.0)
    h.beat(h.one("/v1/leases/heartbeat"), current(1))
    # Renewed to 4 + 10; the next heartbeat, at 8, gets no answer ever.
    h.advance(4.0)
    lost = h.one("/v1/leases/heartbeat")
    h.advance(2.6)
    again = [c for c in h.pending("/v1/leases/heartbeat") if c is not lost]
    assert len(again) == 1
    h.beat(again[0], current(1))
    h.advance(6.0)
    assert h.executor.stopped == []
    assert h.executor.deadlines["job-1"] > 20.0


def test_a_frozen_worker_renews_nothing_when_it_wakes_past_the_fence():
    """A worker process frozen past its fence (SIGSTOP), whose heartbeat was
    acknowledged while it slept, does not renew the lease on waking: the
    spawner helper has killed the job, and the worker reports it fenced even
    when the job's end is read before its own timer runs."""
    h = fencing_harness()
    h.worker.startService()
    h.grant(lease(1))
    h.advance(5.0)
    beat = h.one("/v1/leases/heartbeat")
    # The worker freezes for 14 s; the dispatcher's answer waits in the
    # socket, then the helper's report of the kill.
    h.fence_clock.frozen_for = 14.0
    h.beat(beat, current(1))
    assert h.executor.deadlines["job-1"] == 10.0
    assert h.executor.stopped == ["job-1"]
    h.executor.finish("job-1", Outcome(JobState.FAILED, exit_code=-9))
    (item,) = h.one("/v1/leases/results").json["results"]
    assert item["state"] == "failed"
    assert "no heartbeat was acknowledged" in item["error"]


def test_a_job_killed_at_its_deadline_while_the_worker_slept_is_reported_fenced():
    """A job whose end (killed by the helper at its deadline) is read before
    the worker's own fence timer has run is reported as stopped by its
    worker, not as a job killed by a signal."""
    h = fencing_harness()
    h.worker.startService()
    h.grant(lease(1))
    h.fence_clock.frozen_for = 11.0
    h.executor.finish("job-1", Outcome(JobState.FAILED, exit_code=-9))
    (item,) = h.one("/v1/leases/results").json["results"]
    assert "stopped by its worker" in item["error"]


def test_a_job_that_succeeded_before_its_fence_keeps_its_success():
    """A job that ended in success before its fence (the worker was frozen
    when it did) is reported as succeeded: it ran once, to its end."""
    h = fencing_harness()
    h.worker.startService()
    h.grant(lease(1))
    h.fence_clock.frozen_for = 11.0
    h.executor.finish("job-1", Outcome(JobState.SUCCEEDED, exit_code=0))
    (item,) = h.one("/v1/leases/results").json["results"]
    assert item["state"] == "succeeded" and item["error"] is None


def test_a_lease_read_after_its_fence_is_not_started_but_given_back():
    """A lease whose answer the worker reads only after its fence has passed
    (it was frozen with a long-poll open) is not run: it goes back as
    released."""
    h = fencing_harness()
    h.worker.startService()
    h.fence_clock.frozen_for = 30.0
    h.grant(lease(1))
    assert h.executor.runs == {}
    (item,) = h.one("/v1/leases/results").json["results"]
    assert (item["job_id"], item["state"]) == ("job-1", "released")


def test_a_long_poll_counts_its_wait_from_when_it_was_sent():
    """The fence of a lease granted on a long-poll is counted from when the
    poll was sent, with the fence_seconds the dispatcher gives for it (which
    counts the time it held the poll)."""
    h = fencing_harness()
    h.worker.startService()
    h.advance(20.0)
    h.grant(lease(1), fence_seconds=29.0)
    assert h.executor.deadlines["job-1"] == pytest.approx(29.0)


def test_a_refused_log_does_not_hold_the_result_up():
    """A log chunk the dispatcher refuses outright (a 400 without a size)
    is not retried for ever: the stream is given up and the result goes."""
    h = Harness()
    h.worker.startService()
    h.grant(lease(1))
    h.logs["job-1/attempt-1/stdout"] = b"abc"
    h.executor.finish("job-1")
    h.answer(h.one("/v1/leases/log"), error("invalid_field", "no", "stream"), code=400)
    assert len(h.pending("/v1/leases/results")) == 1
    assert h.pending("/v1/leases/log") == []


def test_an_offset_refused_without_a_size_is_resent_from_the_start():
    """A 400 on the offset that does not say the dispatcher's size makes the
    worker resend the stream from 0, which is always allowed."""
    h = Harness()
    h.worker.startService()
    h.grant(lease(1))
    h.logs["job-1/attempt-1/stdout"] = b"abc"
    h.advance(5.0)
    h.answer(h.one("/v1/leases/log"), LogWritten(3))
    h.logs["job-1/attempt-1/stdout"] += b"def"
    h.executor.finish("job-1")
    log = h.one("/v1/leases/log")
    assert log.query["offset"] == "3"
    h.answer(log, error("offset_past_end", "send from 0", "offset"), code=400)
    log = h.one("/v1/leases/log")
    assert (log.query["offset"], log.body) == ("0", b"abcdef")


# Real worker processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


class WorkerProcess:
    """A `dispatcher worker` process, logging to a file."""

    def __init__(self, tmp_path, url, token_file, slots=2, name="w-e2e",
                 ini=TEST_TASKS, program=("dispatcher", "worker"), log_level="debug"):
        self.dir = tmp_path / name
        self.dir.mkdir()
        self.config = self.dir / "worker.ini"
        self.config.write_text(as_the_tests_account(ini))
        self.logfile = self.dir / "worker.log"
        self.name = name
        self.args = [
            os.path.join(BIN, program[0]), *program[1:], "--url", url,
            "--token-file", str(token_file), "--slots", str(slots),
            "--config", str(self.config), "--name", name,
            "--data-dir", str(self.dir / "data"), "--cpus", "2", "--memory", "1024",
            "--gpus", "0", "--grace", "5"]
        if log_level is not None:
            # The tests read the lines of each job's lease, end and result.
            self.args += ["--log-level", log_level]
        self.process = None

    def start(self):
        with open(self.logfile, "ab") as log:
            self.process = subprocess.Popen(
                self.args, cwd=str(self.dir), env=dict(os.environ, PYTHONPATH=ROOT),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def output(self):
        return self.logfile.read_text()

    def stop(self, timeout=30):
        """SIGTERM, and the exit status (blocking: only for a worker with no
        dispatcher in this process to talk to)."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    async def stop_async(self, timeout=30):
        """SIGTERM, waiting without blocking the reactor (the worker may be
        talking to a dispatcher in this process)."""
        self.process.send_signal(signal.SIGTERM)
        waited = 0.0
        while self.process.poll() is None:
            assert waited < timeout, self.output()
            await sleep(0.05)
            waited += 0.05
        return self.process.returncode

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def workers():
    """Worker processes, killed at teardown if a test left them running."""
    started = []
    yield started
    for worker in started:
        worker.kill()


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_worker_plugin_is_found():
    """twistd finds the dispatcher-worker plugin next to the dispatcher."""
    makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert makers["dispatcher-worker"].module == "dispatcher.app.worker_tap"
    assert makers["dispatcher-worker"].options().__module__ == "dispatcher.app.worker_tap"


def test_worker_command_refuses_bad_options_in_one_line(tmp_path):
    """`dispatcher worker` with a wrong option exits 2 and says what is
    wrong in one line, before any reactor starts."""
    done = subprocess.run(
        [os.path.join(BIN, "dispatcher"), "worker", "--url", "https://h",
         "--token-file", str(tmp_path / "none"), "--slots", "1"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == (
        f"dispatcher worker: --token-file {tmp_path / 'none'}: cannot read the "
        "token file: No such file or directory")


@pytest.mark.parametrize("program", [
    ("dispatcher", "worker"),
    ("twistd", "-n", "--pidfile", "", "dispatcher-worker"),
])
def test_worker_process_backs_off_and_stops_on_sigterm(
        tmp_path, token_file, workers, program):
    """A real worker (the console script, or the twistd plugin as a
    supervisor runs it) whose dispatcher is unreachable keeps retrying with
    back-off, without a log line for each connection it tries, and exits
    cleanly on SIGTERM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = WorkerProcess(tmp_path, f"http://127.0.0.1:{port}", token_file,
                           program=program)
    workers.append(worker.start())
    wait_for(lambda: worker.output().count("asking for work failed") >= 2)
    assert "Connection was refused" in worker.output()
    assert "Starting factory" not in worker.output()
    assert worker.stop() in (0, -signal.SIGTERM)
    assert f"worker {worker.name} stopped" in worker.output()


# End to end: a real dispatcher and real worker processes

async def remote_daemon(make_daemon, tmp_path, token_file):
    """A dispatcher that runs nothing itself and takes workers."""
    return await make_daemon(
        f"[executor]\nslots = 0\n\n[workers]\ntoken_file = {token_file}\n"
        "lease_seconds = 6\n")


@pytest_twisted.ensureDeferred
async def test_command_and_task_jobs_run_on_a_worker(
        make_daemon, tmp_path, token_file, workers):
    """A command job and a task job submitted to a dispatcher with no slots
    of its own run on a worker process, succeed, and show their output
    through GET /v1/jobs/{id}/log."""
    daemon = await remote_daemon(make_daemon, tmp_path, token_file)
    worker = WorkerProcess(tmp_path, daemon.url, token_file, name="node-a")
    workers.append(worker.start())
    command = await daemon.submit({"command": [
        "sh", "-c", "echo out $DISPATCHER_JOB_ID; echo err >&2"]})
    task = await daemon.submit({"task": "add", "args": [2, 3]})
    done = await daemon.wait(command["id"])
    assert done["state"] == "succeeded", (done, worker.output())
    assert done["exit_code"] == 0
    assert done["worker"] == "node-a"
    response, content = await daemon.request("GET", f"/v1/jobs/{command['id']}/log")
    assert content.decode() == f"out {command['id']}\n"
    response, content = await daemon.request(
        "GET", f"/v1/jobs/{command['id']}/log?stream=stderr")
    assert content.decode() == "err\n"
    done = await daemon.wait(task["id"])
    assert done["state"] == "succeeded", (done, worker.output())
    assert done["result"] == 5
    assert done["worker"] == "node-a"
    # The dispatcher knows the worker as it described itself.
    code, listed = await daemon.json("GET", "/v1/workers")
    assert code == 200, listed
    [described] = [w for w in listed["workers"] if w["name"] == "node-a"]
    assert described["slots"] == 2
    assert described["resources"] == {"cpus": 2.0, "memory_mb": 1024, "gpus": 0}
    assert "add" in described["tasks"]
    assert await worker.stop_async() in (0, -signal.SIGTERM)
    assert "worker node-a stopped" in worker.output()


@pytest_twisted.ensureDeferred
async def test_a_one_job_worker_process_runs_one_job_and_exits_0(
        make_daemon, tmp_path, token_file, workers):
    """A `dispatcher worker --one-job` process takes one job of the two
    queued, runs it, and exits 0 by itself once its result is recorded,
    its log written out to its stop line before it exits; the
    other job stays queued."""
    daemon = await remote_daemon(make_daemon, tmp_path, token_file)
    first, second = await daemon.batch([
        {"command": ["sh", "-c", "exit 0"]}, {"command": ["sh", "-c", "exit 0"]}])
    worker = WorkerProcess(tmp_path, daemon.url, token_file, slots=1, name="node-one")
    worker.args += ["--one-job"]
    workers.append(worker.start())
    waited = 0.0
    while worker.process.poll() is None:
        assert waited < 30, worker.output()
        await sleep(0.05)
        waited += 0.05
    assert worker.process.returncode == 0, worker.output()
    jobs = [await daemon.wait(job["id"], states=("succeeded", "queued"))
            for job in (first, second)]
    assert sorted(job["state"] for job in jobs) == ["queued", "succeeded"], jobs
    [done] = [job for job in jobs if job["state"] == "succeeded"]
    assert done["worker"] == "node-one"
    assert "worker node-one stopped; it was granted 1 leases in 1 answers" in (
        worker.output()), worker.output()


def test_a_one_job_workers_exit_status_is_what_its_system_exit_says(capsys):
    """A one-job worker leaves by os._exit with the status a SystemExit
    would have given: None is 0, an integer itself (as the OS keeps it),
    a message 1, written to stderr."""
    from dispatcher.app._cli import exit_status

    assert exit_status(None) == 0
    assert exit_status(0) == 0 and exit_status(3) == 3 and exit_status(-15) == 241
    assert exit_status("dispatcher worker: no luck") == 1
    assert capsys.readouterr().err == "dispatcher worker: no luck\n"


def test_dispatcher_worker_starts_without_the_api_commands():
    """`dispatcher worker` goes to the worker's own parser without the
    click group of the API commands (a one-job worker starts for each
    job of a direct-mode Slurm backend): neither click nor dispatcher.cli
    is imported, and its options work as before."""
    done = subprocess.run(
        [sys.executable, "-c",
         "import sys\n"
         "from dispatcher.app._cli import main\n"
         "try:\n"
         "    main(['worker', '--version'])\n"
         "except SystemExit as e:\n"
         "    print(e.code, 'click' in sys.modules, 'dispatcher.cli' in sys.modules)\n"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr
    version, said = done.stdout.splitlines()
    assert version.startswith("dispatcher-worker ")
    assert said == "0 False False"


@pytest_twisted.ensureDeferred
async def test_a_task_that_fails_on_a_worker_shows_its_traceback(
        make_daemon, tmp_path, token_file, workers):
    """A task that raises fails with the exception in its error, and its
    traceback is the job's stderr log, as on the daemon's own host."""
    daemon = await remote_daemon(make_daemon, tmp_path, token_file)
    worker = WorkerProcess(tmp_path, daemon.url, token_file, name="node-b")
    workers.append(worker.start())
    job = await daemon.submit({"task": "fail", "args": ["no luck"]})
    done = await daemon.wait(job["id"])
    assert done["state"] == "failed"
    assert "ValueError: no luck" in done["error"]
    response, content = await daemon.request(
        "GET", f"/v1/jobs/{job['id']}/log?stream=stderr")
    assert "Traceback" in content.decode() and "no luck" in content.decode()
    await worker.stop_async()


@pytest_twisted.ensureDeferred
async def test_a_worker_logs_no_line_a_job_by_default(
        make_daemon, tmp_path, token_file, workers):
    """Without --log-level, a worker logs its start and its stop (with how
    many leases came in how many answers), not a line for each job's
    lease, end or result; the jobs run as ever."""
    daemon = await remote_daemon(make_daemon, tmp_path, token_file)
    jobs = await daemon.batch([{"task": "add", "args": [n, 1]} for n in range(6)])
    worker = WorkerProcess(tmp_path, daemon.url, token_file, slots=3, name="node-q",
                           log_level=None)
    workers.append(worker.start())
    for job in jobs:
        assert (await daemon.wait(job["id"]))["state"] == "succeeded", worker.output()
    assert await worker.stop_async() == 0
    said = worker.output()
    assert "worker node-q asks" in said
    assert "worker node-q stopped; it was granted 6 leases in " in said
    for per_job in ("leased", "ended:", "result recorded"):
        assert not any(per_job in line for line in said.splitlines()
                       if "node-q stopped" not in line), said


@pytest_twisted.ensureDeferred
async def test_several_jobs_come_in_one_lease_answer(
        make_daemon, tmp_path, token_file, workers):
    """Jobs queued before a worker connects are all leased in its first
    answer, up to its slots, and run at the same time."""
    daemon = await remote_daemon(make_daemon, tmp_path, token_file)
    jobs = await daemon.batch([
        {"command": ["sh", "-c", f"echo {n}; sleep 0.5"]} for n in range(3)])
    worker = WorkerProcess(tmp_path, daemon.url, token_file, slots=3, name="node-c")
    workers.append(worker.start())
    for n, job in enumerate(jobs):
        done = await daemon.wait(job["id"])
        assert done["state"] == "succeeded", (done, worker.output())
        response, content = await daemon.request("GET", f"/v1/jobs/{job['id']}/log")
        assert content.decode() == f"{n}\n"
    assert "3 jobs leased in one answer" in worker.output()
    starts = sorted(job["started_at"] for job in [
        (await daemon.json("GET", f"/v1/jobs/{j['id']}"))[1] for j in jobs])
    finishes = sorted(job["finished_at"] for job in [
        (await daemon.json("GET", f"/v1/jobs/{j['id']}"))[1] for j in jobs])
    # All three ran at once: the last started before the first finished.
    assert starts[-1] < finishes[0]
    await worker.stop_async()


@pytest_twisted.ensureDeferred
async def test_a_worker_with_a_wrong_token_runs_nothing(
        make_daemon, tmp_path, token_file, workers):
    """A worker whose token the dispatcher refuses logs the refusal and
    gets no job; the job stays queued."""
    daemon = await remote_daemon(make_daemon, tmp_path, token_file)
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-right-token-at-all\n")
    wrong.chmod(0o600)  # one others may read is refused
    worker = WorkerProcess(tmp_path, daemon.url, wrong, name="node-d")
    workers.append(worker.start())
    job = await daemon.submit({"command": ["true"]})
    waited = 0.0
    while "refused asking for work" not in worker.output():
        assert waited < 20, worker.output()
        await sleep(0.05)
        waited += 0.05
    assert "401" in worker.output()
    code, now = await daemon.json("GET", f"/v1/jobs/{job['id']}")
    assert now["state"] == "queued"
    await worker.stop_async()


@pytest.fixture
def file_server(tmp_path):
    """A real local HTTP server of files, on an ephemeral port."""
    root = tmp_path / "served"
    root.mkdir()
    (root / "data.txt").write_bytes(b"payload\n")
    port = pytest_twisted.blockon(
        serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(File(str(root)))))
    yield f"http://127.0.0.1:{port.getHost().port}"
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_a_worker_stages_inputs_on_its_own_host(
        make_daemon, tmp_path, token_file, workers, file_server):
    """A job with inputs is leased in staging; the worker fetches them into
    the job's directory on its host, tells the dispatcher it runs, and the
    job reads them."""
    daemon = await remote_daemon(make_daemon, tmp_path, token_file)
    # The file server is on 127.0.0.1: the worker's own [fetch] allow, not
    # the dispatcher's, lets it fetch from there.
    worker = WorkerProcess(tmp_path, daemon.url, token_file, name="node-e",
                           ini=TEST_TASKS + "[fetch]\nallow = 127.0.0.0/8\n")
    workers.append(worker.start())
    digest = hashlib.sha256(b"payload\n").hexdigest()
    job = await daemon.submit({
        "command": ["sh", "-c", "cat in/data.txt; sleep 1"],
        "inputs": [{"url": f"{file_server}/data.txt", "path": "in/data.txt",
                    "sha256": digest}]})
    running = await daemon.wait(job["id"], states=("running", "succeeded", "failed"))
    assert running["state"] == "running", (running, worker.output())
    done = await daemon.wait(job["id"])
    assert done["state"] == "succeeded", (done, worker.output())
    _, out = await daemon.request("GET", f"/v1/jobs/{job['id']}/log")
    assert out == b"payload\n"
    staged = list((tmp_path / "node-e" / "data" / "jobs").glob("*/*/*/*/*/work/in/data.txt"))
    assert [p.read_bytes() for p in staged] == [b"payload\n"]
    await worker.stop_async()


@pytest_twisted.ensureDeferred
async def test_a_remote_jobs_output_shows_while_it_runs(
        make_daemon, tmp_path, token_file, workers):
    """A running job's output reaches GET /v1/jobs/{id}/log with the
    worker's heartbeats, before the job ends."""
    daemon = await remote_daemon(make_daemon, tmp_path, token_file)
    worker = WorkerProcess(tmp_path, daemon.url, token_file, name="node-f")
    workers.append(worker.start())
    job = await daemon.submit({"command": ["sh", "-c", "echo early; sleep 30"]})
    waited = 0.0
    while True:
        _, out = await daemon.request("GET", f"/v1/jobs/{job['id']}/log")
        if out == b"early\n":
            break
        assert waited < 15, (out, worker.output())
        await sleep(0.1)
        waited += 0.1
    code, now = await daemon.json("GET", f"/v1/jobs/{job['id']}")
    assert now["state"] == "running"
    code, _ = await daemon.json("POST", f"/v1/jobs/{job['id']}/cancel")
    assert code == 202
    done = await daemon.wait(job["id"])
    assert done["state"] == "cancelled", (done, worker.output())
    await worker.stop_async()


def test_a_one_job_worker_takes_one_job_and_is_finished_once_it_is_delivered():
    """With one_job, the worker asks for one job, asks for nothing more once
    it is granted (its report asks for no work), and fires finished once
    the dispatcher has its result."""
    h = Harness(slots=1, one_job=True)
    h.worker.startService()
    assert h.one("/v1/leases").json["max_jobs"] == 1
    h.grant(lease(1))
    h.executor.finish("job-1", Outcome(JobState.FAILED, exit_code=3))
    report = h.one("/v1/leases/results")
    assert "max_jobs" not in report.json
    assert report.json["results"][0]["exit_code"] == 3
    assert not h.worker.finished.called
    h.results(report, recorded(1))
    assert h.worker.finished.called
    h.advance(60, step=1)
    assert h.pending("/v1/leases") == []


def test_a_one_job_workers_stop_fails_its_job_saying_why():
    """A one-job worker stopped (its Slurm job signalled) while its job
    runs stops the job and reports it failed with its stop reason and how
    long after its start (a time limit told from a cancel), its attempt
    spent, not released unspent as a plain worker's stop would."""
    h = Harness(slots=1, one_job=True, grace=0.0,
                stop_reason="its Slurm job 7 was ended by Slurm")
    h.worker.startService()
    h.grant(lease(1))
    for _ in range(42):
        h.advance(1)
        for call in h.pending("/v1/leases/heartbeat"):
            h.beat(call, current(1))
    assert h.executor.stopped == []
    stopped = h.worker.stopService()
    h.advance(0.1)
    assert h.executor.stopped == ["job-1"]
    h.executor.finish("job-1", Outcome(JobState.FAILED, exit_code=-15, stopped=True))
    report = h.one("/v1/leases/results")
    (result,) = report.json["results"]
    assert result["state"] == "failed"
    assert result["error"] == "its Slurm job 7 was ended by Slurm, 42 s after its start"
    h.results(report, recorded(1))
    h.advance(1.0)
    assert stopped.called and h.worker.finished.called
