"""
Fixtures shared by the tests: a real daemon on an ephemeral port, and a
treq client with its own connection pool.

DISPATCHER_TEST_STORE=postgresql runs the daemons of make_daemon on the
PostgreSQL store (a database of the test's own for each data directory):
the API's tests on the other store, on demand.
"""

import json
import os
import re
import socket
import time

import attrs
import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.web.client import Agent, HTTPConnectionPool

from dispatcher.config._ini import StoreConfig, parse_config
from dispatcher.app._daemon import DaemonService
from tests.postgres import database_for, drop_databases

TEST_TASKS = """
[tasks]
add = tests.tasks:add
describe = tests.tasks:describe
block = tests.tasks:block
wait_for_cancel = tests.tasks:wait_for_cancel
fail = tests.tasks:fail
not_json = tests.tasks:not_json
read_input = tests.tasks:read_input
"""


def as_the_tests_account(ini):
    """The ini text with [executor] run_as naming the account the tests run
    as, unless it names one: most tests have their jobs write where the test
    looks, and a daemon running as root would run them as nobody.  The
    run-as tests (tests/test_run_as.py) say whom they mean."""
    if os.geteuid() != 0 or re.search(r"^\s*run_as\s*=", ini, re.M):
        return ini
    if re.search(r"^\[executor\]", ini, re.M):
        return re.sub(r"^\[executor\][^\n]*\n", "[executor]\nrun_as = root\n", ini,
                      count=1, flags=re.M)
    return ini + "\n[executor]\nrun_as = root\n"


# The workers' bearer token of the tests that run remote workers.
WORKER_TOKEN = "worker-token-0123456789"


@pytest.fixture
def token_file(tmp_path):
    """The workers' token, as the dispatcher and the workers read it."""
    path = tmp_path / "worker.token"
    path.write_text(WORKER_TOKEN + "\n")
    path.chmod(0o600)  # one others may read is refused
    return path


def sleep(seconds):
    """A Deferred that fires after real seconds: only for waiting on real
    processes, never to order logic."""
    d = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def run_clock(clock, seconds, step=0.5):
    """Let seconds pass on a fake clock as they pass for a reactor that is
    running: in steps shorter than the worker hub's stall watchdog tick, so
    that no timer fires late.  (One clock.advance past a due timer is a
    stall: the dispatcher could not run meanwhile.)"""
    end = clock.seconds() + seconds
    while clock.seconds() < end:
        clock.advance(min(step, end - clock.seconds()))


async def until(condition, timeout=10.0):
    """Wait, on the real reactor, until condition() is true: for what a real
    request or a real commit does, never to let a fake clock's time pass.
    Fails after timeout seconds rather than hanging."""
    waited = 0.0
    while not condition():
        assert waited < timeout, "timed out waiting for the condition"
        await sleep(0.002)
        waited += 0.002


def poll(condition, timeout=15.0, what="the condition"):
    """Call condition() until it returns something true, for what another
    process does (a real twistd, a worker, Slurm); return that.  Blocks:
    for tests that do not run on the reactor."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def admin_token(data_dir):
    """The admin token a daemon made on its first start in data_dir, or
    None (a configured credential, or authentication off)."""
    try:
        with open(os.path.join(data_dir, "admin.token")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


class Daemon:
    """A running DaemonService and a client for its API."""

    def __init__(self, service, client):
        self.service = service
        self.client = client
        port = service.port.getHost().port
        self.url = f"http://127.0.0.1:{port}"
        self.token = admin_token(service.config.dispatcher.data_dir)

    async def request(self, method, path, body=None, headers=None, raw=None):
        hdrs = {"Content-Type": ["application/json"]}
        if self.token is not None:
            hdrs["Authorization"] = [f"Bearer {self.token}"]
        if headers:
            hdrs.update(headers)
        data = raw if raw is not None else (
            None if body is None else json.dumps(body).encode())
        response = await self.client.request(
            method, self.url + path, data=data, headers=hdrs)
        content = await response.content()
        return response, content

    async def json(self, method, path, body=None, **kw):
        response, content = await self.request(method, path, body, **kw)
        return response.code, json.loads(content)

    async def submit(self, body):
        code, job = await self.json("POST", "/v1/jobs", body)
        assert code == 201, job
        return job

    async def batch(self, jobs, full=False, **kw):
        if full:
            kw.setdefault("headers", {})["Prefer"] = ["return=representation"]
        code, answer = await self.json("POST", "/v1/jobs/batch", {"jobs": jobs}, **kw)
        assert code == 201, answer
        return answer["jobs"]

    async def wait(self, job_id, states=("succeeded", "failed", "cancelled"),
                   timeout=20.0):
        """Poll a job until it reaches one of states (real processes run in
        real time)."""
        waited = 0.0
        while True:
            code, job = await self.json("GET", f"/v1/jobs/{job_id}")
            assert code == 200, job
            if job["state"] in states:
                return job
            if waited > timeout:
                raise AssertionError(f"job stayed {job['state']}: {job}")
            await sleep(0.02)
            waited += 0.02


@pytest.fixture
def client():
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield HTTPClient(Agent(reactor, pool=pool))
    pytest_twisted.blockon(pool.closeCachedConnections())


@pytest.fixture
def make_daemon(tmp_path, client):
    """Start daemons with extra ini text; all are stopped at teardown."""
    services = []

    async def make(ini="", data_dir=None, clock=None):
        config = parse_config(as_the_tests_account(TEST_TASKS + ini), "test.ini")
        data_dir = str(data_dir or tmp_path / "data")
        config = attrs.evolve(
            config,
            dispatcher=attrs.evolve(config.dispatcher, data_dir=data_dir),
        )
        if os.environ.get("DISPATCHER_TEST_STORE") == "postgresql" and config.store.url is None:
            # The daemon tests on the PostgreSQL store: a database for each
            # data directory (the same one after a restart), dropped with
            # the test's others.
            # Local leases that outlive any jump of a test's clock: these
            # tests are of one dispatcher, whose fake clock, moved a minute
            # at once, would otherwise look stalled past its fence
            # (tests/test_postgres_dispatchers.py tests the fence).
            config = attrs.evolve(
                config,
                store=StoreConfig(url=database_for(tmp_path, data_dir), lease_seconds=86400),
            )
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        service = DaemonService(reactor, config, endpoint, clock=clock)
        service.startService()
        services.append((service, clock))
        await service.ready
        return Daemon(service, client)

    yield make
    for service, clock in services:
        if service.running:
            stopped = service.stopService()
            # With a test clock, the grace period and kill grace pass only
            # when the clock moves.
            while clock is not None and not stopped.called:
                clock.advance(60)
                pytest_twisted.blockon(sleep(0.01))
            pytest_twisted.blockon(stopped)
    drop_databases(tmp_path)


@pytest.fixture
def daemon(make_daemon):
    return pytest_twisted.blockon(Deferred.fromCoroutine(make_daemon()))


_EXIT_STATUS = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """A test that fails before it stops its daemon leaves the daemon's
    thread pools running, and Python then waits for them for ever after the
    report: CI would hang to its limit instead of failing.  Exit with the
    session's status once everything is reported, naming what was left."""
    import sys
    import threading

    left = [t for t in threading.enumerate()
            if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not left or not _EXIT_STATUS:
        return
    sys.stderr.write(
        f"conftest: {len(left)} threads left running ({', '.join(sorted({t.name for t in left})[:5])}"
        "...): exiting without waiting for them\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[0])


@pytest.fixture(autouse=True)
def _umask():
    """Building twistd's service sets the process umask as the daemon does
    (dispatcher.app.tap.makeService); every test starts from the one the
    suite started with."""
    mask = os.umask(0o022)
    os.umask(mask)
    yield
    os.umask(mask)
