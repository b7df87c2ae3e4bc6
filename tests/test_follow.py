"""
Log follows (GET /v1/jobs/{id}/log?follow=true): the follower's logic on a
test clock, with real files and reads run in the test's thread; then real
daemons (an in-process one, real `twistd -n dispatcher` processes and a
real `dispatcher worker`) for the promises users rely on.
"""

import re
import signal
import socket
import time
import urllib.request

import pytest
import pytest_twisted
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from dispatcher.api._follow import (
    CHUNK,
    POLL_INTERVAL,
    REFRESH_INTERVAL,
    LogFollowers,
)
from dispatcher.model._jobs import Attempt, Job, JobSpec, JobState, UnknownJob
from dispatcher.wire._submission import ApiError

from .conftest import until
from .test_remote import pure_twistd, start_worker  # noqa: F401 (a fixture)
from .test_twistd import Twistd


# The follower's logic, on a test clock

class FakeRequest:
    """What a follow uses of a request: what it was sent, and how it ended."""

    def __init__(self):
        self.headers = {}
        self.body = b""
        self.started = False
        self.finished = False
        self.closed = False
        self.producer = None
        self.lost = []

    def setHeader(self, name, value):
        self.headers[name] = value

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        assert not (self.finished or self.closed)
        self.started = True
        self.body += data

    def finish(self):
        self.finished = True

    def loseConnection(self):
        self.closed = True

    def when_lost(self, callback):
        self.lost.append(callback)

    def go_away(self):
        for callback in self.lost:
            callback()


def job_of(state, *attempts, job_id="j1"):
    return Job(job_id, state, JobSpec(command=("true",)), 0.0, attempts=tuple(attempts))


def running(number=1):
    return Attempt(number, "local@test", 1.0)


def ended(number=1):
    return Attempt(number, "local@test", 1.0, finished_at=2.0, exit_code=0)


class Setting:
    """LogFollowers on a Clock, with a store of jobs in a dict, job events
    published by hand, and reads run at once in the test's thread."""

    def __init__(self, tmp_path, max_followers=8):
        self.clock = Clock()
        self.jobs = {}
        self.subscribers = []
        self.reads = 0
        self.dir = tmp_path

        def subscribe(callback):
            self.subscribers.append(callback)
            return lambda: self.subscribers.remove(callback)

        def get_job(job_id):
            self.reads += 1
            if job_id not in self.jobs:
                return fail(UnknownJob(job_id))
            return succeed(self.jobs[job_id])

        def run(f, *args):
            try:
                return succeed(f(*args))
            except Exception:
                return fail()

        self.followers = LogFollowers(
            run, self.clock, subscribe, get_job, self.path, max_followers)

    def path(self, job_id, attempt, stream):
        return str(self.dir / f"{job_id}-{attempt}-{stream}")

    def write(self, data, job_id="j1", attempt=1, stream="stdout"):
        with open(self.path(job_id, attempt, stream), "ab") as f:
            f.write(data)

    def change(self, job):
        self.jobs[job.id] = job
        for callback in list(self.subscribers):
            callback(type("Event", (), {"job_id": job.id, "state": job.state})())

    def follow(self, job_id="j1", attempt=None, stream="stdout", offset=0, who="ann"):
        request = FakeRequest()
        self.followers.follow(request, self.jobs[job_id], attempt, stream, offset, who)
        return request


def test_bytes_written_reach_the_follower_within_a_tick_and_the_answer_ends_with_the_attempt(
        tmp_path):
    """What the file gains is sent at the next look (one POLL_INTERVAL
    later), nothing is sent twice, and the answer ends once the job event
    says the attempt ended, with the bytes written before its end."""
    s = Setting(tmp_path)
    s.jobs["j1"] = job_of(JobState.RUNNING, running())
    s.write(b"one\n")
    request = s.follow()
    assert request.started and request.body == b""
    assert request.headers[b"content-type"].startswith(b"text/plain")
    s.clock.advance(POLL_INTERVAL)
    assert request.body == b"one\n"
    s.write(b"two\n")
    assert request.body == b"one\n"
    s.clock.advance(POLL_INTERVAL)
    assert request.body == b"one\ntwo\n"
    s.write(b"last\n")
    s.change(job_of(JobState.SUCCEEDED, ended()))
    assert request.body == b"one\ntwo\nlast\n"
    assert request.finished and not request.closed
    assert s.followers.count == 0
    assert not s.subscribers
    assert not s.clock.getDelayedCalls()


def test_a_follow_from_an_offset_sends_what_follows_it(tmp_path):
    """offset skips bytes; an offset past the end waits for the file to
    reach it."""
    s = Setting(tmp_path)
    s.jobs["j1"] = job_of(JobState.RUNNING, running())
    s.write(b"0123456789")
    request = s.follow(offset=4)
    s.clock.advance(POLL_INTERVAL)
    assert request.body == b"456789"
    far = s.follow(offset=12)
    s.clock.advance(POLL_INTERVAL)
    assert far.body == b""
    s.write(b"abcdef")
    s.clock.advance(POLL_INTERVAL)
    assert far.body == b"cdef"


def test_a_follow_of_a_job_without_an_attempt_waits_for_its_first(tmp_path):
    """A queued job's follow sends nothing until its first attempt starts,
    then follows it; a job cancelled before any attempt ends the answer
    empty."""
    s = Setting(tmp_path)
    s.jobs["j1"] = job_of(JobState.QUEUED)
    request = s.follow()
    s.clock.advance(POLL_INTERVAL * 4)
    assert request.body == b"" and not request.finished
    s.write(b"started\n")
    s.change(job_of(JobState.RUNNING, running()))
    s.clock.advance(POLL_INTERVAL)
    assert request.body == b"started\n"
    s.change(job_of(JobState.SUCCEEDED, ended()))
    assert request.finished

    s.jobs["j2"] = job_of(JobState.QUEUED, job_id="j2")
    never = s.follow("j2")
    s.change(job_of(JobState.CANCELLED, job_id="j2"))
    assert never.finished and never.body == b""


def test_a_follow_of_an_earlier_attempt_ends_once_it_is_sent(tmp_path):
    """attempt=1 of a job on its second attempt is sent whole and the
    answer ends: that attempt has ended."""
    s = Setting(tmp_path)
    s.jobs["j1"] = job_of(JobState.RUNNING, ended(1), running(2))
    s.write(b"first try\n", attempt=1)
    s.write(b"second\n", attempt=2)
    request = s.follow(attempt=1)
    assert request.body == b"first try\n"
    assert request.finished


def test_a_follower_reads_nothing_while_its_client_takes_nothing(tmp_path):
    """Paused (the connection's send buffer is full), a follower reads no
    more of the file, however it grows, and holds at most one chunk; it
    goes on where it stopped once resumed."""
    s = Setting(tmp_path)
    s.jobs["j1"] = job_of(JobState.RUNNING, running())
    request = s.follow()
    request.producer.pauseProducing()
    s.write(b"x" * (CHUNK * 10))
    for _ in range(10):
        s.clock.advance(POLL_INTERVAL)
    assert request.body == b""
    # No look at the file is made for a paused follower.
    assert not s.clock.getDelayedCalls()
    request.producer.resumeProducing()
    s.clock.advance(POLL_INTERVAL)
    assert len(request.body) == CHUNK * 10

    # A client that takes one write and then fills its buffer: each resume
    # sends one chunk, no more.
    slow = s.follow()
    write = slow.write

    def write_then_full(data):
        write(data)
        if data:
            slow.producer.pauseProducing()

    slow.write = write_then_full
    s.clock.advance(POLL_INTERVAL)
    assert len(slow.body) == CHUNK
    s.clock.advance(POLL_INTERVAL * 4)
    assert len(slow.body) == CHUNK
    slow.producer.resumeProducing()
    assert len(slow.body) == 2 * CHUNK


def test_a_follower_is_freed_when_its_client_goes(tmp_path):
    """A client that goes frees its follower at once: the count falls, the
    events are no longer listened to, the timer stops, and the next bytes
    are not read for it."""
    s = Setting(tmp_path)
    s.jobs["j1"] = job_of(JobState.RUNNING, running())
    request = s.follow()
    s.clock.advance(POLL_INTERVAL)
    assert s.followers.count == 1 and s.subscribers
    request.go_away()
    assert s.followers.count == 0
    assert not s.subscribers
    assert not s.clock.getDelayedCalls()
    s.write(b"late\n")
    s.clock.advance(POLL_INTERVAL)
    assert request.body == b""


def test_followers_are_bounded_in_all_and_per_principal(tmp_path):
    """Past [api] max_log_followers a follow is a 503 too_many_followers
    with Retry-After; one principal may hold a quarter of them; a freed
    place is taken again."""
    s = Setting(tmp_path, max_followers=8)
    s.jobs["j1"] = job_of(JobState.RUNNING, running())
    ann = [s.follow(who="ann") for _ in range(2)]
    with pytest.raises(ApiError) as refused:
        s.follow(who="ann")
    assert refused.value.status == 503 and refused.value.code == "too_many_followers"
    assert refused.value.headers[b"retry-after"] == b"5"
    assert "a quarter" in refused.value.message
    others = [s.follow(who=f"p{i // 2}") for i in range(6)]
    with pytest.raises(ApiError) as full:
        s.follow(who="zed")
    assert "max_log_followers = 8" not in full.value.message
    assert "8 log follows" in full.value.message
    ann[0].go_away()
    s.follow(who="zed")
    assert s.followers.count == 8
    del others


def test_stop_closes_every_follow_without_its_last_chunk(tmp_path):
    """A stopping daemon ends every follow at once by closing its
    connection (no last chunk: the client knows the attempt did not end
    there), and refuses new ones."""
    s = Setting(tmp_path)
    s.jobs["j1"] = job_of(JobState.RUNNING, running())
    requests = [s.follow(), s.follow()]
    s.followers.stop()
    assert all(r.closed and not r.finished for r in requests)
    assert s.followers.count == 0
    assert not s.clock.getDelayedCalls()
    with pytest.raises(ApiError) as refused:
        s.follow()
    assert refused.value.code == "shutting_down"


def test_a_remote_chunk_reaches_followers_without_waiting_for_the_timer(tmp_path):
    """The writer of a worker's chunks tells the followers of that stream
    at once; followers of another stream or attempt are not told."""
    s = Setting(tmp_path)
    s.jobs["j1"] = job_of(JobState.RUNNING, running())
    out = s.follow()
    err = s.follow(stream="stderr")
    s.write(b"chunk\n")
    s.followers.written("j1", 1, "stdout", 6)
    assert out.body == b"chunk\n"
    assert err.body == b""
    # A size past what the file holds (bytes dropped past the cap) sends
    # what is there and waits.
    s.followers.written("j1", 1, "stdout", 100)
    assert out.body == b"chunk\n" and not out.finished


def test_a_followed_job_is_read_again_without_an_event(tmp_path):
    """Every REFRESH_INTERVAL seconds a followed job is read from the store
    even if no event came, so a missed event cannot hold a follow open
    for ever; one read serves all the job's followers."""
    s = Setting(tmp_path)
    s.jobs["j1"] = job_of(JobState.RUNNING, running())
    requests = [s.follow(), s.follow()]
    reads = s.reads
    s.jobs["j1"] = job_of(JobState.FAILED, ended())
    t = 0.0
    while t < REFRESH_INTERVAL + POLL_INTERVAL:
        s.clock.advance(POLL_INTERVAL)
        t += POLL_INTERVAL
    assert all(r.finished for r in requests)
    assert s.reads == reads + 1


def test_a_removed_job_closes_its_follows(tmp_path):
    """A job removed while followed (a DELETE, retention) closes the
    follow's connection without the last chunk."""
    s = Setting(tmp_path)
    s.jobs["j1"] = job_of(JobState.RUNNING, running())
    request = s.follow()
    del s.jobs["j1"]
    for callback in list(s.subscribers):
        callback(type("Event", (), {"job_id": "j1", "state": JobState.SUCCEEDED})())
    assert request.closed and not request.finished
    assert s.followers.count == 0


# Real daemons

FINAL = ("succeeded", "failed", "cancelled")


def follow_lines(daemon, path, token=None):
    """GET path (a follow) from a real daemon: its response's headers, and
    each line with the time it arrived, until the answer ends."""
    import http.client

    host, port = daemon.url.rsplit("/", 1)[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("GET", path, headers={
        "Authorization": f"Bearer {token or daemon.token}"})
    response = connection.getresponse()
    lines = []
    while True:
        line = response.readline()
        if not line:
            break
        lines.append((time.monotonic(), line))
    connection.close()
    return response, lines, time.monotonic()


def raw_follow(daemon, path, receive_buffer=None):
    """A socket that sent GET path (a follow) and has read nothing."""
    host, port = daemon.url.rsplit("/", 1)[1].split(":")
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((host, int(port)))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {daemon.token}\r\n\r\n".encode())
    return sock


def read_to_close(sock, timeout):
    """What arrives on sock until the daemon closes it (or aborts it) or
    timeout, and whether it did close."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            more = sock.recv(65536)
            if not more:
                return data, True
            data += more
    except ConnectionResetError:
        return data, True
    except socket.timeout:
        return data, False


def resident_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


@pytest.fixture
def twistd_daemon(tmp_path):
    """Start a `twistd -n dispatcher` with the given ini; killed at teardown."""
    made = []

    def start(ini="", where="d"):
        workdir = tmp_path / where
        workdir.mkdir()
        daemon = Twistd(str(workdir), ini)
        daemon.start()
        made.append(daemon)
        return daemon

    yield start
    for daemon in made:
        daemon.stop()


PAUSED_LINES = ["sh", "-c", "for i in 1 2 3 4; do echo line $i; sleep 0.8; done"]


@pytest.mark.parametrize("cap", ["67108864", "0"], ids=["log-cap", "no-cap"])
def test_follow_streams_a_local_jobs_output_as_it_is_written(twistd_daemon, cap):
    """A follow of a local job that prints lines with pauses gets each line
    well before the job ends (with a log cap, through the spawner helper's
    pipes; without, from the file the job writes itself), and the answer
    ends, chunked, as the job ends, with every byte."""
    daemon = twistd_daemon(f"[executor]\nslots = 1\nmax_log_bytes = {cap}\n")
    code, job = daemon.request("POST", "/v1/jobs", {"command": PAUSED_LINES})
    assert code == 201
    response, lines, ended = follow_lines(daemon, f"/v1/jobs/{job['id']}/log?follow=true")
    assert response.status == 200
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.getheader("Content-Type").startswith("text/plain")
    assert [line for _, line in lines] == [b"line 1\n", b"line 2\n", b"line 3\n", b"line 4\n"]
    # Three pauses of 0.8 s came after the first line: it came as written.
    assert ended - lines[0][0] > 1.8
    assert lines[1][0] - lines[0][0] > 0.5
    # The answer ended with the attempt: the job is final by then.
    code, done = daemon.request("GET", f"/v1/jobs/{job['id']}")
    assert done["state"] == "succeeded"
    # A follow of the finished job sends it whole and ends at once.
    response, again, _ = follow_lines(daemon, f"/v1/jobs/{job['id']}/log?follow=true&offset=7")
    assert b"".join(line for _, line in again) == b"line 2\nline 3\nline 4\n"


def test_follow_of_a_queued_job_waits_for_its_attempt(twistd_daemon):
    """A follow of a job that has not started (it waits for another) sends
    its output once it runs, and ends with it."""
    daemon = twistd_daemon("[executor]\nslots = 1\n")
    code, first = daemon.request("POST", "/v1/jobs", {"command": ["sleep", "1"]})
    code, second = daemon.request("POST", "/v1/jobs", {"command": ["echo", "second"]})
    assert daemon.request("GET", f"/v1/jobs/{second['id']}")[1]["state"] == "queued"
    response, lines, _ = follow_lines(daemon, f"/v1/jobs/{second['id']}/log?follow=true")
    assert [line for _, line in lines] == [b"second\n"]
    assert daemon.request("GET", f"/v1/jobs/{second['id']}")[1]["state"] == "succeeded"


def test_follow_streams_a_remote_jobs_output_through_a_real_worker(
        tmp_path, token_file, start_worker):  # noqa: F811 (a fixture)
    """A job run by a real `dispatcher worker` is followed as its chunks
    arrive (shipped with each heartbeat), and the answer ends once its
    result is recorded, with every byte."""
    daemon = pure_twistd(tmp_path, token_file, "lease_seconds = 2\n")
    try:
        start_worker(daemon.url, "node-f")
        code, job = daemon.request("POST", "/v1/jobs", {"command": PAUSED_LINES})
        assert code == 201
        response, lines, ended = follow_lines(
            daemon, f"/v1/jobs/{job['id']}/log?follow=true")
        assert response.status == 200
        assert b"".join(line for _, line in lines) == b"line 1\nline 2\nline 3\nline 4\n"
        assert ended - lines[0][0] > 1.0
        done = daemon.request("GET", f"/v1/jobs/{job['id']}")[1]
        assert done["state"] == "succeeded" and done["worker"] == "node-f"
    finally:
        daemon.stop()


def test_every_attempts_log_is_served_after_a_retry(twistd_daemon):
    """After a failed first attempt and a second, attempt=1 serves the first
    attempt's log (plain and followed), attempt=2 and the default the
    second's; an attempt the job never had is a 404 naming attempt."""
    daemon = twistd_daemon("[executor]\nslots = 1\n")
    code, job = daemon.request("POST", "/v1/jobs", {
        "command": ["sh", "-c", 'echo "try $DISPATCHER_ATTEMPT"; test "$DISPATCHER_ATTEMPT" -ge 2'],
        "max_attempts": 2, "retry_delay": 0.01})
    done = daemon.wait(job["id"], FINAL)
    assert done["state"] == "succeeded"
    assert [a["number"] for a in done["attempts"]] == [1, 2]

    def log(query):
        request = urllib.request.Request(
            f"{daemon.url}/v1/jobs/{job['id']}/log{query}",
            headers={"Authorization": f"Bearer {daemon.token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    assert log("?attempt=1") == (200, b"try 1\n")
    assert log("?attempt=2") == (200, b"try 2\n")
    assert log("") == (200, b"try 2\n")
    assert log("?attempt=1&follow=true") == (200, b"try 1\n")
    code, body = log("?attempt=3")
    assert code == 404 and b'"field":"attempt"' in body and b"its attempts: 1, 2" in body
    for bad in ("?attempt=0", "?attempt=x", "?follow=yes", "?attempt=1&attempt=2"):
        code, body = log(bad)
        assert code == 400 and b"invalid_query" in body, bad


def test_a_client_that_never_reads_does_not_grow_the_daemons_memory(twistd_daemon):
    """A follower whose client reads nothing while its job writes 200 MB
    holds the log in neither the daemon's memory nor its buffers (its
    resident size grows by a few MB at most); once the client goes, its
    place is free again at once."""
    daemon = twistd_daemon(
        "[executor]\nslots = 1\nmax_log_bytes = 0\n"
        # One follow per credential: the stalled one holds it.
        "[api]\nmax_log_followers = 4\n")
    code, job = daemon.request("POST", "/v1/jobs", {"command": [
        "sh", "-c", "sleep 1; head -c 200000000 /dev/zero | tr '\\0' x; sleep 1"]})
    assert code == 201
    path = f"/v1/jobs/{job['id']}/log?follow=true"
    headers = {"Authorization": f"Bearer {daemon.token}"}
    sock = raw_follow(daemon, path, receive_buffer=4096)
    try:
        time.sleep(0.5)
        before = resident_kib(daemon.process.pid)
        # A second follow by the same credential is over its share.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(daemon.url + path, headers=headers),
                                   timeout=10)
        assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "5"
        assert b"too_many_followers" in refused.value.read()
        done = daemon.wait(job["id"], FINAL, timeout=60)
        assert done["state"] == "succeeded"
        after = resident_kib(daemon.process.pid)
        print(f"resident: {before} KiB before, {after} KiB after 200 MB written")
        assert after - before < 16 * 1024, (before, after)
        # Its answer began, and waits in the client's buffers.
        assert sock.recv(12, socket.MSG_PEEK) == b"HTTP/1.1 200"
    finally:
        # Closed with unread bytes: the daemon gets a reset.
        sock.close()
    # Its place is free: a follow of the finished job gets the log whole.
    deadline = time.monotonic() + 5
    while True:
        try:
            response = urllib.request.urlopen(
                urllib.request.Request(daemon.url + path, headers=headers), timeout=30)
            break
        except urllib.error.HTTPError as e:
            assert e.code == 503 and time.monotonic() < deadline
            time.sleep(0.05)
    total = 0
    with response:
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                break
            total += len(chunk)
    assert total == 200_000_000


def test_a_stopping_daemon_ends_its_follows_at_once(twistd_daemon):
    """SIGTERM ends every follow at once, while the running job still has
    its grace period: the connection closes without the answer's last
    chunk, so the client knows it did not reach the attempt's end."""
    daemon = twistd_daemon("[dispatcher]\nshutdown_grace = 30\n[executor]\nslots = 1\n")
    code, job = daemon.request("POST", "/v1/jobs", {
        "command": ["sh", "-c", "echo started; sleep 60"]})
    daemon.wait(job["id"], ("running",))
    sock = raw_follow(daemon, f"/v1/jobs/{job['id']}/log?follow=true")
    try:
        data, closed = read_to_close(sock, 1.0)
        assert not closed and data.startswith(b"HTTP/1.1 200")
        daemon.process.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        more, closed = read_to_close(sock, 5.0)
        assert closed and time.monotonic() - t0 < 2.0
        data += more
        assert b"started\n" in data
        assert not data.endswith(b"0\r\n\r\n")
        # The daemon still waits for its job (its grace period).
        assert daemon.process.poll() is None
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_a_follower_is_freed_as_soon_as_its_client_goes(make_daemon):
    """A client that drops its follow frees the follower in the daemon at
    once: none is left counted, listening to events or polling."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    daemon = await make_daemon("[executor]\nslots = 1\n")
    job = await daemon.submit({"command": ["sh", "-c", "echo hi; sleep 30"]})
    await daemon.wait(job["id"], ("running",))
    followers = daemon.service.api._followers

    class Follow(Protocol):
        received = b""

        def connectionMade(self):
            self.transport.write(
                f"GET /v1/jobs/{job['id']}/log?follow=true HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\nAuthorization: Bearer {daemon.token}\r\n\r\n".encode())

        def dataReceived(self, data):
            self.received += data

    port = int(daemon.url.rsplit(":", 1)[1])
    client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Follow())
    await until(lambda: b"hi\n" in client.received)
    assert followers.count == 1
    client.transport.abortConnection()
    await until(lambda: followers.count == 0)
    assert followers._unsubscribe is None and followers._timer is None
    await daemon.json("POST", f"/v1/jobs/{job['id']}/cancel")
