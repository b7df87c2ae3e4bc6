"""
Tests for L{dispatcher.execution._staging}: the logic with C{StubTreq} and a C{Clock},
and the promises users rely on against a real local HTTP server.
"""

from __future__ import annotations

import gc
import hashlib
import os
import pwd
import tracemalloc
from typing import Any, Callable, Optional

import attrs
import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.basic import FileSender
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.client import HTTPConnectionPool, ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.pages import notFound
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dispatcher.config._ini import FetchConfig, network_list
from dispatcher.execution._fetch_policy import FetchPolicy
from dispatcher.execution._http_client import input_http_client
from dispatcher.execution._interfaces import IInputStager
from dispatcher.model._jobs import InputSpec
from dispatcher.execution._staging import (
    _BATCH_BYTES,
    _HIGH_WATER_BYTES,
    InputStager,
    StagingError,
    _BodyWriter,
    _PartFile,
    _TryFailed,
)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(directory: Any) -> list[str]:
    """
    Every file under C{directory}, relative to it.
    """
    found = []
    for parent, _, files in os.walk(directory):
        for name in files:
            found.append(os.path.relpath(os.path.join(parent, name), directory))
    return sorted(found)


# --- Doubles for reactor-free unit tests -----------------------------------


class ImmediateThreads:
    """
    A thread pool and reactor in one, for C{deferToThreadPool}: the work
    runs at once, in the calling thread.
    """

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class HeldThreads:
    """
    A stand-in for the thread pool whose work runs only when the test says.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[..., Any], tuple, Deferred]] = []

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append((f, args, d))
        return d

    def run_next(self) -> None:
        f, args, d = self.pending.pop(0)
        try:
            result = f(*args)
        except BaseException:
            d.errback(Failure())
        else:
            d.callback(result)

    def run_all(self) -> None:
        while self.pending:
            self.run_next()


def result_of(d: Deferred) -> Any:
    """
    The result a L{Deferred} already fired with; raise its failure.
    """
    results: list = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failure_of(d: Deferred, kind: type = StagingError) -> Any:
    """
    The exception a L{Deferred} already failed with, checked for its type.
    """
    with pytest.raises(kind) as info:
        result_of(d)
    return info.value


class Script(Resource):
    """
    Answers requests in turn with C{(code, body, headers)} answers; the last
    one repeats.  C{None} as an answer leaves the request hanging.
    """

    isLeaf = True

    def __init__(self, *answers: Optional[tuple[int, bytes, dict]]) -> None:
        super().__init__()
        self.answers = list(answers)
        self.requests = 0
        self.hanging: list[Any] = []

    def render_GET(self, request):
        answer = self.answers[min(self.requests, len(self.answers) - 1)]
        self.requests += 1
        if answer is None:
            self.hanging.append(request)
            return NOT_DONE_YET
        code, body, headers = answer
        request.setResponseCode(code)
        for name, value in headers.items():
            request.setHeader(name, value)
        return body


def ok(body: bytes, **headers: str) -> tuple[int, bytes, dict]:
    return (200, body, headers)


def status(code: int) -> tuple[int, bytes, dict]:
    return (code, b"nope", {})


@attrs.define
class Unit:
    """
    A stager wired to a C{StubTreq}, a C{Clock} and work that runs at once.
    """

    stager: InputStager
    clock: Clock
    stub: StubTreq
    workdir: str

    def stage(self, *inputs: InputSpec) -> Deferred:
        return self.stager.stage_inputs(inputs, self.workdir)


def unit(tmp_path, resource: Resource, **config: Any) -> Unit:
    clock = Clock()
    stub = StubTreq(resource)
    threads = ImmediateThreads()
    stager = InputStager(stub, clock, FetchConfig(**config), threads, threads)
    return Unit(stager, clock, stub, str(tmp_path / "work"))


URL = "http://files.example/data/y.csv"


# --- Unit tests ----------------------------------------------------------


def test_provides_interface(tmp_path):
    """
    An L{InputStager} provides L{IInputStager}.
    """
    u = unit(tmp_path, Script(ok(b"")))
    assert verifyObject(IInputStager, u.stager)


def test_error_message_names_input():
    """
    A L{StagingError} keeps its parts and says which input failed and why.
    """
    e = StagingError(2, "https://x/y", "data/y.csv", "sha256 mismatch: expected ab, got 9f")
    assert (e.index, e.url, e.path, e.reason) == (
        2, "https://x/y", "data/y.csv", "sha256 mismatch: expected ab, got 9f"
    )
    assert str(e) == "input 2 (https://x/y -> data/y.csv): sha256 mismatch: expected ab, got 9f"


def test_fetches_into_workdir(tmp_path):
    """
    Each input lands at its path under the working directory, parent
    directories created, with no temporary file left beside it.
    """
    body = b"a,b\n1,2\n"
    u = unit(tmp_path, Script(ok(body)))
    result_of(u.stage(InputSpec(URL, "data/in/y.csv", sha256(body).upper())))
    assert (tmp_path / "work/data/in/y.csv").read_bytes() == body
    assert leftovers(tmp_path / "work") == ["data/in/y.csv"]


def test_sha256_mismatch(tmp_path):
    """
    A body whose sha256 differs fails at once, names the input and both
    digests, and leaves no file.
    """
    script = Script(ok(b"wrong"))
    u = unit(tmp_path, script, retries=3)
    expected = sha256(b"right")
    d = u.stage(InputSpec("http://x.example/a", "a"), InputSpec(URL, "y.csv", expected))
    e = failure_of(d)
    assert e.index == 1
    assert str(e) == (
        f"input 1 ({URL} -> y.csv): sha256 mismatch:"
        f" expected {expected}, got {sha256(b'wrong')}"
    )
    assert script.requests == 2
    assert leftovers(tmp_path / "work") == ["a"]


@pytest.mark.parametrize("code", [400, 403, 404, 410])
def test_client_errors_not_retried(tmp_path, code):
    """
    A 4xx answer fails at the first try with the status code.
    """
    script = Script(status(code))
    u = unit(tmp_path, script, retries=3)
    e = failure_of(u.stage(InputSpec(URL, "y.csv")))
    assert f"the server answered HTTP {code}" in e.reason
    assert "tries" not in e.reason
    assert script.requests == 1
    assert leftovers(tmp_path / "work") == []


def test_server_errors_retried_with_backoff(tmp_path):
    """
    5xx answers are retried C{retries} times, each wait between half and all
    of C{retry_delay * 2**n}, and the error says how many tries were made.
    """
    script = Script(status(503))
    u = unit(tmp_path, script, retries=3, retry_delay=1.0)
    d = u.stage(InputSpec(URL, "y.csv"))
    assert script.requests == 1
    for n, base in enumerate([1.0, 2.0, 4.0], start=2):
        u.clock.advance(base * 0.5 - 0.001)
        assert script.requests == n - 1
        u.clock.advance(base * 0.5 + 0.001)
        assert script.requests == n
    e = failure_of(d)
    assert e.reason == (
        "the server answered HTTP 503 Service Unavailable;"
        " gave up after 4 tries ([fetch] retries = 3)"
    )
    assert u.clock.getDelayedCalls() == []
    assert leftovers(tmp_path / "work") == []


@pytest.mark.parametrize("code", [408, 429, 500, 502])
def test_transient_statuses_retried(tmp_path, code):
    """
    408, 429 and 5xx answers are retried, and a later success stages the
    input.
    """
    script = Script(status(code), ok(b"fine"))
    u = unit(tmp_path, script, retries=1, retry_delay=0.5)
    d = u.stage(InputSpec(URL, "y.csv"))
    u.clock.advance(0.5)
    assert result_of(d) is None
    assert script.requests == 2
    assert (tmp_path / "work/y.csv").read_bytes() == b"fine"


def test_no_retries_configured(tmp_path):
    """
    With C{retries = 0} a transient failure is final after one try.
    """
    script = Script(status(500))
    u = unit(tmp_path, script, retries=0)
    e = failure_of(u.stage(InputSpec(URL, "y.csv")))
    assert e.reason.endswith("gave up after 1 try ([fetch] retries = 0)")
    assert script.requests == 1


def test_announced_length_over_limit(tmp_path):
    """
    A Content-Length above C{max_bytes} fails before the body is read, and
    is not retried.
    """
    script = Script(ok(b"x" * 101))
    u = unit(tmp_path, script, max_bytes=100, retries=2)
    e = failure_of(u.stage(InputSpec(URL, "y.csv")))
    assert e.reason == (
        "the server announced 101 bytes, larger than the limit of 100 bytes"
        " ([fetch] max_bytes)"
    )
    assert script.requests == 1
    assert leftovers(tmp_path / "work") == []


def test_length_at_limit(tmp_path):
    """
    A body of exactly C{max_bytes} is accepted.
    """
    u = unit(tmp_path, Script(ok(b"x" * 100)), max_bytes=100)
    result_of(u.stage(InputSpec(URL, "y.csv")))
    assert (tmp_path / "work/y.csv").read_bytes() == b"x" * 100


def test_timeout(tmp_path):
    """
    A server that never answers fails the try after C{timeout} seconds, and
    every try is timed again.
    """
    script = Script(None)
    u = unit(tmp_path, script, timeout=5.0, retries=1, retry_delay=1.0)
    d = u.stage(InputSpec(URL, "y.csv"))
    u.clock.advance(4.9)
    assert not d.called
    u.clock.advance(0.1)
    assert script.requests == 1
    u.clock.advance(1.0)
    assert script.requests == 2
    u.clock.advance(4.9)
    assert not d.called
    u.clock.advance(0.1)
    e = failure_of(d)
    assert e.reason == (
        "timed out after 5 s ([fetch] timeout); gave up after 2 tries"
        " ([fetch] retries = 1)"
    )
    assert u.clock.getDelayedCalls() == []
    assert leftovers(tmp_path / "work") == []


def test_timeout_then_success(tmp_path):
    """
    A try that timed out is retried, and the retry's answer stages the input.
    """
    script = Script(None, ok(b"late"))
    u = unit(tmp_path, script, timeout=2.0, retries=1, retry_delay=0.0)
    d = u.stage(InputSpec(URL, "y.csv"))
    u.clock.advance(2.0)
    u.clock.advance(0)
    assert result_of(d) is None
    assert (tmp_path / "work/y.csv").read_bytes() == b"late"
    assert u.clock.getDelayedCalls() == []


def test_cancel(tmp_path):
    """
    Cancelling staging stops the fetch in progress, leaves no temporary file
    and no timer behind, and fails with L{CancelledError}, not a
    L{StagingError}.
    """
    u = unit(tmp_path, Script(None))
    d = u.stage(InputSpec(URL, "y.csv"))
    assert leftovers(tmp_path / "work") != []
    d.cancel()
    failure_of(d, CancelledError)
    assert leftovers(tmp_path / "work") == []
    assert u.clock.getDelayedCalls() == []


def test_cancel_during_backoff(tmp_path):
    """
    Cancelling staging while it waits to retry stops the wait.
    """
    script = Script(status(500))
    u = unit(tmp_path, script, retries=3)
    d = u.stage(InputSpec(URL, "y.csv"))
    d.cancel()
    failure_of(d, CancelledError)
    assert u.clock.getDelayedCalls() == []
    assert script.requests == 1


@pytest.mark.parametrize(
    "url, reason",
    [
        ("ftp://files.example/y.csv", "only http and https URLs can be fetched, not ftp"),
        ("file:///etc/passwd", "only http and https URLs can be fetched, not file"),
        ("files.example/y.csv", "the URL has no scheme; only http and https URLs can be fetched"),
        ("http:///y.csv", "the URL has no host"),
    ],
)
def test_refuses_other_urls(tmp_path, url, reason):
    """
    A URL that is not http or https, or has no host, fails at once without
    a request.
    """
    script = Script(ok(b"x"))
    u = unit(tmp_path, script)
    e = failure_of(u.stage(InputSpec(url, "y.csv")))
    assert str(e) == f"input 0 ({url} -> y.csv): {reason}"
    assert script.requests == 0


def test_upper_case_scheme(tmp_path):
    """
    The scheme is compared without regard to case.
    """
    u = unit(tmp_path, Script(ok(b"x")))
    result_of(u.stage(InputSpec("HTTP://files.example/y", "y")))
    assert (tmp_path / "work/y").read_bytes() == b"x"


@pytest.mark.parametrize("path", ["../y.csv", "a/../../y.csv", "/tmp/y.csv", "", "a/.."])
def test_refuses_paths_outside_workdir(tmp_path, path):
    """
    A path that is absolute or climbs out of the working directory fails
    without a request.
    """
    script = Script(ok(b"x"))
    u = unit(tmp_path, script)
    e = failure_of(u.stage(InputSpec(URL, path)))
    assert e.path == path
    assert "working directory" in e.reason
    assert script.requests == 0


def test_refuses_symlink_out_of_workdir(tmp_path):
    """
    A path through a symbolic link that leads out of the working directory
    fails and writes nothing there.
    """
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "work/link").symlink_to(outside)
    u = unit(tmp_path, Script(ok(b"x")))
    e = failure_of(u.stage(InputSpec(URL, "link/y.csv")))
    assert "outside the working directory" in e.reason
    assert list(outside.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another account needs root")
def test_inputs_are_given_to_the_jobs_account(tmp_path):
    """With an owner, the input and the directories made on its way belong
    to that account (the job's), and the file keeps its content."""
    nobody = pwd.getpwnam("nobody")
    owner = (nobody.pw_uid, nobody.pw_gid)
    u = unit(tmp_path, Script(ok(b"x")))
    result_of(u.stager.stage_inputs([InputSpec(URL, "a/b/y.csv")], u.workdir, owner))
    for path in ("a", "a/b", "a/b/y.csv"):
        found = os.stat(tmp_path / "work" / path)
        assert (found.st_uid, found.st_gid) == owner, path
    assert (tmp_path / "work/a/b/y.csv").read_bytes() == b"x"


def test_unwritable_target(tmp_path):
    """
    A target that cannot be written (here a directory) fails with the
    reason from the file system, without retries.
    """
    (tmp_path / "work/y.csv").mkdir(parents=True)
    script = Script(ok(b"x"))
    u = unit(tmp_path, script, retries=2)
    e = failure_of(u.stage(InputSpec(URL, "y.csv")))
    assert e.reason.startswith("cannot write y.csv in the working directory: ")
    assert script.requests == 1
    assert leftovers(tmp_path / "work") == []


def test_refused_connection_retried(tmp_path):
    """
    A refused connection is retried and then reported with its host and
    port.
    """
    from twisted.internet.error import ConnectionRefusedError

    @attrs.define
    class Refusing:
        calls: int = 0

        def get(self, url, **kwargs):
            from twisted.internet.defer import fail

            self.calls += 1
            return fail(ConnectionRefusedError())

    client = Refusing()
    threads = ImmediateThreads()
    clock = Clock()
    stager = InputStager(
        client, clock, FetchConfig(retries=1, retry_delay=0.0), threads, threads
    )
    d = stager.stage_inputs([InputSpec("http://h.example:81/y", "y")], str(tmp_path))
    clock.advance(0)
    e = failure_of(d)
    assert e.reason == (
        "cannot connect to h.example:81: connection refused;"
        " gave up after 2 tries ([fetch] retries = 1)"
    )
    assert client.calls == 2


def test_unexpected_error(tmp_path, clean_reactor):
    """
    An error the stager did not foresee still fails as a L{StagingError}
    naming the input, and is logged with its traceback.
    """

    class Strange:
        code = 200
        length = UNKNOWN_LENGTH

        def deliverBody(self, protocol):
            raise RuntimeError("no body here")

    class Client:
        def get(self, url, **kwargs):
            return succeed(Strange())

    threads = ImmediateThreads()
    stager = InputStager(Client(), Clock(), FetchConfig(retries=3), threads, threads)
    d = stager.stage_inputs([InputSpec(URL, "y.csv")], str(tmp_path))
    e = failure_of(d)
    assert str(e) == f"input 0 ({URL} -> y.csv): unexpected error: RuntimeError: no body here"
    [logged] = clean_reactor
    assert logged["log_failure"].check(RuntimeError)
    clean_reactor.clear()
    assert leftovers(tmp_path) == []


# --- The body writer: memory stays bounded ------------------------------------


def test_body_writer_pauses_until_writes_catch_up(tmp_path):
    """
    While writes lag behind, the body writer buffers at most about
    C{_HIGH_WATER_BYTES}, pauses the connection, and resumes it once the
    writes catch up; the file gets every byte in order.
    """
    held = HeldThreads()
    part = _PartFile(held.run, str(tmp_path), "big.bin")
    opened = part.open()
    held.run_next()
    result_of(opened)

    writer = _BodyWriter(part, 100 * _HIGH_WATER_BYTES, "big.bin")
    transport = StringTransport()
    writer.makeConnection(transport)
    chunk = 64 * 1024
    body = os.urandom(4 * _HIGH_WATER_BYTES)
    sent = 0
    while transport.producerState == "producing":
        writer.dataReceived(body[sent : sent + chunk])
        sent += chunk
    # One batch is in a thread, the rest waits in memory, within the bound.
    assert len(held.pending) == 1
    assert sent <= _HIGH_WATER_BYTES + chunk
    assert sent >= _HIGH_WATER_BYTES

    held.run_next()
    assert transport.producerState == "producing"
    while sent < len(body):
        if transport.producerState == "paused":
            held.run_next()
            continue
        writer.dataReceived(body[sent : sent + chunk])
        sent += chunk
    writer.connectionLost(Failure(ResponseDone()))
    assert not writer.done.called
    held.run_all()
    result_of(writer.done)

    assert part.size == len(body)
    assert part.hexdigest() == sha256(body)
    committed = part.commit()
    held.run_all()
    result_of(committed)
    assert (tmp_path / "big.bin").read_bytes() == body
    assert leftovers(tmp_path) == ["big.bin"]


def test_body_writer_batches(tmp_path):
    """
    Small chunks are gathered into batches of about C{_BATCH_BYTES} before
    they go to a thread.
    """
    held = HeldThreads()
    part = _PartFile(held.run, str(tmp_path), "f")
    part.open()
    held.run_next()
    writer = _BodyWriter(part, 10 * _BATCH_BYTES, "f")
    writer.makeConnection(StringTransport())
    for _ in range(_BATCH_BYTES // 1024 - 1):
        writer.dataReceived(b"x" * 1024)
    assert held.pending == []
    writer.dataReceived(b"x" * 1024)
    assert len(held.pending) == 1


def test_body_writer_lost_connection_waits_for_write(tmp_path):
    """
    A connection lost mid-body fails as worth retrying, and the temporary
    file is removed only after the write in progress has finished.
    """
    held = HeldThreads()
    part = _PartFile(held.run, str(tmp_path), "f")
    part.open()
    held.run_next()
    writer = _BodyWriter(part, 10 * _BATCH_BYTES, "f")
    transport = StringTransport()
    writer.makeConnection(transport)
    writer.dataReceived(b"x" * _BATCH_BYTES)
    writer.connectionLost(Failure(ConnectionError("gone")))
    e = failure_of(writer.done, _TryFailed)
    assert e.retry
    assert e.reason == f"the connection broke after {_BATCH_BYTES} bytes of the body"

    discarded = part.discard()
    # The discard waits its turn: only the write is with a thread.
    assert [f.__name__ for f, _, _ in held.pending] == ["_write"]
    assert len(leftovers(tmp_path)) == 1
    held.run_next()
    assert [f.__name__ for f, _, _ in held.pending] == ["_discard"]
    assert not discarded.called
    held.run_next()
    result_of(discarded)
    assert leftovers(tmp_path) == []


def test_body_writer_limit_while_streaming(tmp_path):
    """
    A body that grows past C{max_bytes} closes the connection and fails
    without retry.
    """
    held = HeldThreads()
    part = _PartFile(held.run, str(tmp_path), "f")
    part.open()
    held.run_next()
    writer = _BodyWriter(part, 1000, "f")
    transport = StringTransport()
    writer.makeConnection(transport)
    writer.dataReceived(b"x" * 1000)
    assert not writer.done.called
    writer.dataReceived(b"x")
    e = failure_of(writer.done, _TryFailed)
    assert not e.retry
    assert e.reason == "the body is larger than the limit of 1000 bytes ([fetch] max_bytes)"
    assert transport.disconnecting


# --- Integration: a real server, a real client, real threads ----------------


class Tracked(WrappingFactory):
    """
    Keeps the server's connections, so a test can close them and wait.
    """

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self._waiting: list[Deferred] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def close_all(self) -> Deferred:
        for p in list(self.protocols):
            p.transport.abortConnection()
        if not self.protocols:
            return succeed(None)
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d


class OnDisk(Resource):
    """
    Streams a file from disk with its length, as a file server would.
    """

    isLeaf = True

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def render_GET(self, request):
        f = open(self.path, "rb")
        request.setHeader(b"content-length", b"%d" % (os.path.getsize(self.path),))
        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)

        def done(result: object) -> None:
            f.close()
            if not gone:
                request.finish()

        FileSender().beginFileTransfer(f, request).addBoth(done)
        return NOT_DONE_YET


class Flaky(Resource):
    """
    Answers 500 to the first C{failures} requests, then 200 with the body.
    """

    isLeaf = True

    def __init__(self, failures: int, body: bytes) -> None:
        super().__init__()
        self.failures = failures
        self.body = body
        self.requests = 0

    def render_GET(self, request):
        self.requests += 1
        if self.requests <= self.failures:
            request.setResponseCode(500)
            return b"try later"
        return self.body


class Broken(Protocol):
    """
    A bare HTTP server: its first answers announce a length, send part of
    the body and close the connection; later ones are whole.
    """

    def __init__(self, answers: list[str], body: bytes) -> None:
        self.answers = answers
        self.body = body
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" not in self.received:
            return
        whole = self.answers.pop(0) == "whole" if self.answers else True
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(self.body),)
        self.transport.write(head + (self.body if whole else self.body[: len(self.body) // 2]))
        self.transport.loseConnection()


class Endless(Resource):
    """
    A chunked body that never ends: it stops only when the client goes.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.finished: list[Deferred] = []

    def render_GET(self, request):
        self.finished.append(request.notifyFinish())
        request.registerProducer(_Chunks(request, self), False)
        return NOT_DONE_YET


@implementer(IPullProducer)
@attrs.define
class _Chunks:
    request: Any
    endless: Endless

    def resumeProducing(self) -> None:
        self.request.write(b"z" * (64 * 1024))

    def stopProducing(self) -> None:
        pass


class Hang(Resource):
    """
    Never answers; tells when a request arrived and when its connection
    ended.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.arrived: Deferred = Deferred()
        self.finished: list[Deferred] = []

    def render_GET(self, request):
        self.finished.append(request.notifyFinish())
        self.arrived.callback(None)
        return NOT_DONE_YET


@attrs.define
class Server:
    """
    The resources of the local server, and its base URL.
    """

    base: str
    big: bytes
    flaky: Flaky
    endless: Endless
    hang: Hang

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


@pytest_twisted.async_yield_fixture(autouse=True)
async def clean_reactor():
    """
    Fail a test that leaves timers behind in the global reactor, or a
    failure that no one handled.
    """
    before = set(reactor.getDelayedCalls())
    failures: list[dict] = []

    def observe(event: dict) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        # A test that expects a logged failure takes it off this list.
        yield failures
        for _ in range(50):
            left = [c for c in reactor.getDelayedCalls() if c not in before and c.active()]
            if not left:
                break
            # Closing connections takes a turn or two of the reactor.
            await deferLater(reactor, 0.01)
        assert left == []
        # Unhandled failures are reported when their Deferred is collected.
        gc.collect()
        assert [e["log_failure"] for e in failures] == []
    finally:
        globalLogPublisher.removeObserver(observe)


@pytest.fixture
def threads():
    pool = ThreadPool(1, 4, name="test-staging")
    pool.start()
    yield pool
    pool.stop()


@pytest_twisted.async_yield_fixture
async def server(tmp_path):
    big = os.urandom(6 * 1024 * 1024 + 123)
    served = tmp_path / "served"
    served.mkdir()
    (served / "big.bin").write_bytes(big)
    root = Resource()
    root.putChild(b"big.bin", OnDisk(str(served / "big.bin")))
    root.putChild(b"missing", notFound())
    flaky = Flaky(1, b"second time lucky")
    endless = Endless()
    hang = Hang()
    for name, child in [
        (b"flaky", flaky),
        (b"endless", endless),
        (b"hang", hang),
    ]:
        root.putChild(name, child)
    factory = Tracked(Site(root))
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    try:
        yield Server(
            f"http://127.0.0.1:{port.getHost().port}", big, flaky, endless, hang
        )
    finally:
        await port.stopListening()
        await factory.close_all()


@pytest_twisted.async_yield_fixture
async def http_client():
    # The client a host fetches with, with [fetch] allow = 127.0.0.0/8: the
    # test servers listen on 127.0.0.1, which the policy refuses otherwise.
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield input_http_client(reactor, pool, FetchPolicy(ALLOW_LOOPBACK))
    await pool.closeCachedConnections()


ALLOW_LOOPBACK = network_list("127.0.0.0/8")


def real(client, threads, clock=reactor, **config: Any) -> InputStager:
    return InputStager(
        client, clock, FetchConfig(allow=ALLOW_LOOPBACK, **config), threads, reactor
    )


@pytest_twisted.ensureDeferred
async def test_real_big_file(tmp_path, server, http_client, threads):
    """
    A multi-megabyte file arrives whole and checked, without the body ever
    being held in memory.
    """
    stager = real(http_client, threads)
    workdir = tmp_path / "work"
    tracemalloc.start()
    try:
        await stager.stage_inputs(
            [InputSpec(server.url("big.bin"), "in/big.bin", sha256(server.big))],
            str(workdir),
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (workdir / "in/big.bin").read_bytes() == server.big
    assert leftovers(workdir) == ["in/big.bin"]
    assert peak < len(server.big) / 2


@pytest_twisted.ensureDeferred
async def test_real_sha256_mismatch(tmp_path, server, http_client, threads):
    """
    A real download with the wrong sha256 fails naming the input, and
    leaves no file.
    """
    stager = real(http_client, threads)
    workdir = tmp_path / "work"
    wrong = sha256(b"something else")
    with pytest.raises(StagingError) as info:
        await stager.stage_inputs(
            [InputSpec(server.url("big.bin"), "big.bin", wrong)], str(workdir)
        )
    assert str(info.value) == (
        f"input 0 ({server.url('big.bin')} -> big.bin): sha256 mismatch:"
        f" expected {wrong}, got {sha256(server.big)}"
    )
    assert leftovers(workdir) == []


@pytest_twisted.ensureDeferred
async def test_real_not_found(tmp_path, server, http_client, threads):
    """
    A 404 from a real server fails at once with the status.
    """
    stager = real(http_client, threads, retries=3, retry_delay=10.0)
    with pytest.raises(StagingError) as info:
        await stager.stage_inputs(
            [InputSpec(server.url("missing"), "m")], str(tmp_path / "work")
        )
    assert str(info.value) == (
        f"input 0 ({server.url('missing')} -> m): the server answered HTTP 404 Not Found"
    )
    assert leftovers(tmp_path / "work") == []


@pytest_twisted.ensureDeferred
async def test_real_retry_after_500(tmp_path, server, http_client, threads):
    """
    A server that fails once with 500 and then answers is retried into
    success.
    """
    stager = real(http_client, threads, retries=2, retry_delay=0.01)
    await stager.stage_inputs([InputSpec(server.url("flaky"), "f")], str(tmp_path / "w"))
    assert (tmp_path / "w/f").read_bytes() == b"second time lucky"
    assert server.flaky.requests == 2


@pytest_twisted.ensureDeferred
async def test_real_connection_lost_mid_body(tmp_path, http_client, threads):
    """
    A connection lost in the middle of the body fails the try as worth
    retrying, the retry succeeds, and no partial file survives.
    """
    body = os.urandom(512 * 1024)
    answers = ["broken", "broken", "whole"]
    factory = Tracked(Factory.forProtocol(lambda: Broken(answers, body)))
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/b"
        once = real(http_client, threads, retries=0)
        with pytest.raises(StagingError) as info:
            await once.stage_inputs([InputSpec(url, "b")], str(tmp_path / "w"))
        assert info.value.reason == (
            f"the connection broke after {len(body) // 2} bytes of the body;"
            " gave up after 1 try ([fetch] retries = 0)"
        )
        assert leftovers(tmp_path / "w") == []

        twice = real(http_client, threads, retries=1, retry_delay=0.01)
        await twice.stage_inputs([InputSpec(url, "b", sha256(body))], str(tmp_path / "w"))
        assert (tmp_path / "w/b").read_bytes() == body
        assert answers == []
        assert leftovers(tmp_path / "w") == ["b"]
    finally:
        await port.stopListening()
        await factory.close_all()


@pytest_twisted.ensureDeferred
async def test_real_endless_body_over_limit(tmp_path, server, http_client, threads):
    """
    A chunked body that grows past C{max_bytes} fails and the client closes
    the connection rather than read on.
    """
    stager = real(http_client, threads, max_bytes=1024 * 1024, retries=2)
    with pytest.raises(StagingError) as info:
        await stager.stage_inputs(
            [InputSpec(server.url("endless"), "e")], str(tmp_path / "w")
        )
    assert info.value.reason == (
        "the body is larger than the limit of 1048576 bytes ([fetch] max_bytes)"
    )
    # The server sees the client go away, which stops its endless body.
    [finished] = server.endless.finished
    with pytest.raises(Exception):
        await finished
    assert leftovers(tmp_path / "w") == []


@pytest_twisted.ensureDeferred
async def test_real_timeout(tmp_path, server, http_client, threads):
    """
    A server that accepts the request and never answers is given up on
    after C{timeout}, and its connection is closed.
    """
    clock = Clock()
    stager = real(http_client, threads, clock=clock, timeout=30.0, retries=0)
    d = stager.stage_inputs([InputSpec(server.url("hang"), "h")], str(tmp_path / "w"))
    await server.hang.arrived
    clock.advance(30.0)
    with pytest.raises(StagingError) as info:
        await d
    assert info.value.reason == (
        "timed out after 30 s ([fetch] timeout); gave up after 1 try"
        " ([fetch] retries = 0)"
    )
    [finished] = server.hang.finished
    with pytest.raises(Exception):
        await finished
    assert leftovers(tmp_path / "w") == []
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_real_connection_refused(tmp_path, http_client, threads):
    """
    A port where nothing listens gives a connection error that is retried
    and then reported.
    """
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        Site(Resource())
    )
    number = port.getHost().port
    await port.stopListening()
    stager = real(http_client, threads, retries=1, retry_delay=0.01)
    url = f"http://127.0.0.1:{number}/x"
    with pytest.raises(StagingError) as info:
        await stager.stage_inputs([InputSpec(url, "x")], str(tmp_path / "w"))
    assert str(info.value) == (
        f"input 0 ({url} -> x): cannot connect to 127.0.0.1:{number}:"
        " connection refused; gave up after 2 tries ([fetch] retries = 1)"
    )
    assert leftovers(tmp_path / "w") == []
