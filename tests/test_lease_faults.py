"""
Leases under faults, end to end (issue 14): a real `twistd -n dispatcher`
and a real `dispatcher worker`, with the daemon stopped by SIGSTOP for
longer than a lease, or with a TCP proxy between them that loses a lease
answer.
"""

import json
import re
import signal
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.protocol import Factory, Protocol

from .conftest import sleep, until
from .test_remote import gated, poll, start_worker, submit  # noqa: F401 (a fixture)
from .test_twistd import Twistd

# Short enough that a stall of a few seconds outlives every lease.
STALL_LEASE_SECONDS = 3


def daemon_with_workers(tmp_path, token_file, lease_seconds):
    daemon = Twistd(
        str(tmp_path),
        f"[executor]\nslots = 0\n\n[workers]\ntoken_file = {token_file}\n"
        f"lease_seconds = {lease_seconds}\n")
    daemon.start()
    return daemon


@pytest.fixture
def stalling(tmp_path, token_file):
    """A twistd dispatcher with 3-second leases, continued and killed at
    teardown."""
    daemon = daemon_with_workers(tmp_path, token_file, STALL_LEASE_SECONDS)
    yield daemon
    if daemon.process.poll() is None:
        daemon.process.send_signal(signal.SIGCONT)
    daemon.stop()


def test_jobs_that_end_while_the_dispatcher_is_stopped_succeed(
        stalling, start_worker, tmp_path):
    """Jobs whose processes exit 0 while the dispatcher is stopped (SIGSTOP)
    for more than twice its lease_seconds are recorded succeeded with their
    one attempt: the time the dispatcher could not run does not count
    against their leases, and the results waiting in its sockets are read
    before any lease expires.  It logs the stall."""
    gates = tmp_path / "gates"
    gates.mkdir()
    worker = start_worker(stalling.url, "s1", 4)
    jobs = [submit(stalling, {"command": gated(gates, "start", "end"), "max_attempts": 1})
            for _ in range(4)]
    for job in jobs:
        running = stalling.wait(job["id"], ("running", "succeeded", "failed"))
        assert running["state"] == "running", (running, worker.output())
    # Every job has started on the worker.
    poll(lambda: worker.output().count("attempt 1 leased") == 4, what="four leases")
    stalling.process.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        # The jobs end at once, well inside the stall, and the worker tries
        # to report them to a dispatcher that cannot answer.
        (gates / "1").touch()
        poll(lambda: worker.output().count("attempt 1 ended: succeeded") == 4,
             what="the jobs to end")
        while time.monotonic() - stopped < 2 * STALL_LEASE_SECONDS + 1:
            time.sleep(0.1)
    finally:
        stalling.process.send_signal(signal.SIGCONT)
    for job in jobs:
        done = stalling.wait(job["id"], ("succeeded", "failed", "cancelled"))
        assert done["state"] == "succeeded", (done, worker.output())
        assert [(a["holder"], a["exit_code"]) for a in done["attempts"]] == [("s1", 0)]
        # The worker logs the answer to its report once it reads it, which
        # on a busy host may be a little after the job shows succeeded.
        poll(lambda: f"job {job['id']} attempt 1: result recorded" in worker.output(),
             what=f"the worker to log job {job['id']}'s result recorded")
    text = open(tmp_path / "out.log").read()
    # (A loaded machine may add short stalls of its own.)
    stalls = re.findall(r"the dispatcher did not run for ([\d.]+) s", text)
    assert max(map(float, stalls), default=0) >= 2 * STALL_LEASE_SECONDS - 1, text
    assert "no heartbeat" not in text


class Front(Protocol):
    """The worker's side of one proxied connection: what it sends goes to
    the dispatcher; what the dispatcher answers comes back, except the
    first answer to a request for work that carries a lease, which is
    swallowed and the worker's connection reset."""

    def connectionMade(self):
        self.back = None
        self.unsent = b""
        self.request = b""
        self.answer = b""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.factory.port)
        d = connectProtocol(endpoint, Back(self))
        d.addErrback(lambda _: self.transport.abortConnection())

    def joined(self, back):
        self.back = back
        back.transport.write(self.unsent)
        self.unsent = b""

    def dataReceived(self, data):
        # The worker sends one request at a time on a connection: a chunk
        # that starts a request starts with its request line.
        if data[:5] in (b"POST ", b"GET /"):
            self.request = data.split(b"\r\n", 1)[0]
        if self.back is None:
            self.unsent += data
        else:
            self.back.transport.write(data)

    def answered(self, data):
        if self.factory.swallowed or not self.request.startswith(b"POST /v1/leases "):
            self.transport.write(data)
            return
        self.answer += data
        head, _, body = self.answer.partition(b"\r\n\r\n")
        found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if not found or len(body) < int(found.group(1)):
            return
        answer, self.answer = self.answer, b""
        if json.loads(body)["leases"]:
            # Lost on the way, after the dispatcher wrote it.
            self.factory.swallowed.append(json.loads(body))
            self.transport.abortConnection()
            self.back.transport.loseConnection()
            return
        self.transport.write(answer)

    def connectionLost(self, reason):
        if self.back is not None:
            self.back.transport.loseConnection()


class Back(Protocol):
    """The dispatcher's side of one proxied connection."""

    def __init__(self, front):
        self.front = front

    def connectionMade(self):
        self.front.joined(self)

    def dataReceived(self, data):
        self.front.answered(data)

    def connectionLost(self, reason):
        self.front.transport.loseConnection()


@pytest.fixture
def lossy_proxy(tmp_path, token_file):
    """A twistd dispatcher with the default 30-second leases, and a proxy on
    this test's reactor in front of it that loses the first lease answer
    carrying a lease: (daemon, proxy URL, the answers swallowed)."""
    daemon = daemon_with_workers(tmp_path, token_file, 30)
    factory = Factory.forProtocol(Front)
    factory.port = int(daemon.url.rsplit(":", 1)[1])
    factory.swallowed = []
    port = pytest_twisted.blockon(
        serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory))
    yield daemon, f"http://127.0.0.1:{port.getHost().port}", factory.swallowed
    pytest_twisted.blockon(port.stopListening())
    daemon.stop()


async def job_view(client, daemon, job_id):
    response = await client.get(f"{daemon.url}/v1/jobs/{job_id}",
                                headers={"Authorization": [f"Bearer {daemon.token}"]})
    assert response.code == 200
    return json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_a_lease_answer_lost_on_the_way_costs_no_attempt(
        lossy_proxy, start_worker, client):
    """A lease answer the dispatcher wrote and the worker never got (a
    proxy dropped it and reset the connection) does not leave its job
    running for the lease's life and then failed: the worker's next request
    for work does not list the lease, the dispatcher gives the job back
    without counting the attempt, and the same worker runs it, well before
    the 30-second lease would have run out, with max_attempts = 1."""
    daemon, url, swallowed = lossy_proxy
    worker = start_worker(url, "p1", 1)
    response = await client.post(
        f"{daemon.url}/v1/jobs", json={"command": ["true"], "max_attempts": 1},
        headers={"Authorization": [f"Bearer {daemon.token}"]})
    assert response.code == 201
    job = json.loads(await response.content())
    submitted = time.monotonic()
    await until(lambda: swallowed, timeout=10)
    [lost] = swallowed[0]["leases"]
    assert (lost["job_id"], lost["attempt"]) == (job["id"], 1)
    done = None
    while time.monotonic() - submitted < 10:
        done = await job_view(client, daemon, job["id"])
        if done["state"] in ("succeeded", "failed", "cancelled"):
            break
        await sleep(0.05)
    assert done["state"] == "succeeded", (done, worker.output())
    first, second = done["attempts"]
    assert first["holder"] == "p1" and "does not hold its lease" in first["error"]
    assert first["exit_code"] is None
    assert (second["number"], second["holder"], second["exit_code"]) == (2, "p1", 0)
    # The worker logs the answer to its report once it reads it: on a busy
    # host, after the dispatcher already shows the job succeeded.
    await until(lambda: f"job {job['id']} attempt 2: result recorded" in worker.output())
    assert f"job {job['id']} attempt 1 leased" not in worker.output()
    text = open(daemon.workdir + "/out.log").read()
    assert "asks for work without listing its lease" in text
