"""
Remote workers that move between real dispatchers (`twistd -n dispatcher`)
on one real PostgreSQL database (issue 19): a real `dispatcher worker`
given both dispatchers' URLs keeps its running jobs when the one it talks
to is killed with SIGKILL, or restarted; the other takes its leases up
from the store, and each job is recorded once, its one attempt succeeded.
Each attempt keeps a record (its pid, start and end) and an exclusive lock
while it runs, as in tests/test_postgres_dispatchers.py, so that two
copies running at once show.
"""

import os
import secrets
import signal
import time

import pytest
import pytest_twisted

from tests.conftest import TEST_TASKS, free_port, poll, sleep
from tests.postgres import Databases, database_for
from tests.test_postgres_dispatchers import (
    SCRIPT,
    all_jobs,
    attempts_of,
    call,
    check_no_overlap,
    shared_token,
)
from tests.test_twistd import Twistd
from tests.test_worker import WorkerProcess

# A worker unheard for 8 s loses its leases (its fence comes 1 s before);
# it heartbeats every 8/3 s.
WORKER_LEASE_SECONDS = 8


@pytest.fixture
def database():
    made = Databases()
    yield made.url("db")
    made.drop()


@pytest.fixture
def lease_key():
    """The lease token key every dispatcher on the database is given (the
    file lease.key of each data directory): a token one sealed, another
    opens."""
    return secrets.token_bytes(32).hex() + "\n"


def dispatcher(root, name, url, admin_token_file, worker_token_file, key, port=None):
    """A twistd dispatcher named C{name} on the database C{url} that runs
    nothing itself and serves workers, with the shared lease token key."""
    ini = (
        "[executor]\nslots = 0\nkill_grace = 1\n"
        f"[dispatcher]\nname = {name}\n"
        f"[store]\nurl = {url}\nlease_seconds = 3\n"
        f"[api]\ntoken_file = {admin_token_file}\n"
        f"[workers]\ntoken_file = {worker_token_file}\n"
        f"lease_seconds = {WORKER_LEASE_SECONDS}\nfence_margin = 1\n"
    )
    workdir = os.path.join(root, name)
    data = os.path.join(workdir, "data")
    os.makedirs(data, mode=0o700)
    path = os.path.join(data, "lease.key")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(key)
    return Twistd(workdir, ini, listen=f"tcp:{port or free_port()}:interface=127.0.0.1")


def job_body(records, seconds):
    return {"command": ["sh", "-c", SCRIPT],
            "env": {"RECORDS": records, "SECONDS_TO_RUN": str(seconds)}}


def running_on(url, token, job_ids, worker):
    """Whether every job of C{job_ids} runs on C{worker}."""
    for job_id in job_ids:
        _, _, job = call(url, "GET", f"/v1/jobs/{job_id}", token)
        if job["state"] != "running" or job.get("worker") != worker:
            return False
    return True


def test_a_worker_moves_to_the_other_dispatcher_when_its_own_is_killed(
        tmp_path, database, token_file, lease_key):
    """A worker given two dispatchers' URLs runs four jobs from the first;
    the first is killed with SIGKILL: the worker moves to the second, which
    takes its leases up, and the four jobs finish there, each succeeded
    with its one attempt, none run twice at once; new jobs keep flowing to
    the worker through the second."""
    records = str(tmp_path / "records")
    os.mkdir(records)
    admin_file, token = shared_token(tmp_path)
    a = dispatcher(str(tmp_path), "a", database, admin_file, token_file, lease_key)
    b = dispatcher(str(tmp_path), "b", database, admin_file, token_file, lease_key)
    a.start()
    b.start()
    worker = WorkerProcess(tmp_path, a.url, token_file, slots=4, name="mover",
                           ini=TEST_TASKS + "\n[executor]\nkill_grace = 0.5\n")
    worker.args += ["--url", b.url]
    worker.start()
    try:
        first = []
        for _ in range(4):
            code, _, job = call(a.url, "POST", "/v1/jobs", token, job_body(records, 6))
            assert code == 201, job
            first.append(job["id"])
        poll(lambda: running_on(b.url, token, first, "mover"),
             what="the four jobs running on the worker", timeout=30)
        # The worker talks to a (its first URL): it granted the leases.
        assert a.kill(signal.SIGKILL) == -signal.SIGKILL
        killed = time.monotonic()
        for job_id in first:
            done = b.wait(job_id, ("succeeded", "failed", "cancelled"), timeout=60,
                          token=token)
            assert done["state"] == "succeeded", (done, worker.output())
            assert [(x["holder"], x["exit_code"], x["error"]) for x in done["attempts"]] == [
                ("mover", 0, None)], done
            assert len(attempts_of(records, job_id)) == 1
        # They ran on past the kill, not again from the start.
        assert time.monotonic() - killed < 20
        output = worker.output()
        assert f"the dispatcher at {a.url} is unavailable" in output
        assert f"moving to {b.url}" in output
        assert "stopped by its worker" not in output
        with open(os.path.join(b.workdir, "out.log")) as f:
            taken = f.read()
        for job_id in first:
            assert f"job {job_id} attempt 1: worker mover goes on with its lease here" in taken
        # New jobs flow to the worker through b.
        more = []
        for _ in range(6):
            code, _, job = call(b.url, "POST", "/v1/jobs", token, job_body(records, 0.2))
            assert code == 201, job
            more.append(job["id"])
        for job_id in more:
            done = b.wait(job_id, ("succeeded", "failed", "cancelled"), timeout=60,
                          token=token)
            assert (done["state"], done["worker"], len(done["attempts"])) == (
                "succeeded", "mover", 1), done
        jobs = all_jobs(b.url, token)
        assert sorted(jobs) == sorted(first + more)
        check_no_overlap(records, first + more)
    finally:
        worker.kill()
        a.stop()
        b.stop()


def test_a_restarted_dispatcher_takes_its_workers_leases_up(
        tmp_path, database, token_file, lease_key):
    """A dispatcher on PostgreSQL killed with SIGKILL while its worker runs
    two jobs, one of which ends while it is down, and restarted (same name,
    data directory and port) before the worker's fence: both results are
    accepted, each job succeeded with its one attempt."""
    records = str(tmp_path / "records")
    os.mkdir(records)
    admin_file, token = shared_token(tmp_path)
    port = free_port()
    a = dispatcher(str(tmp_path), "a", database, admin_file, token_file, lease_key, port)
    a.start()
    worker = WorkerProcess(tmp_path, a.url, token_file, slots=2, name="stayer",
                           ini=TEST_TASKS + "\n[executor]\nkill_grace = 0.5\n")
    worker.start()
    try:
        short_ = call(a.url, "POST", "/v1/jobs", token, job_body(records, 1.5))[2]["id"]
        long_ = call(a.url, "POST", "/v1/jobs", token, job_body(records, 5))[2]["id"]
        poll(lambda: running_on(a.url, token, [short_, long_], "stayer")
             and all(os.path.exists(os.path.join(records, j)) for j in (short_, long_)),
             what="both jobs running on the worker", timeout=30)
        assert a.kill(signal.SIGKILL) == -signal.SIGKILL
        # The short one ends while the dispatcher is down.
        poll(lambda: len(attempts_of(records, short_)) == 1
             and attempts_of(records, short_)[0][2] is not None,
             what="the short job's end", timeout=10)
        a.start()
        for job_id in (short_, long_):
            done = a.wait(job_id, ("succeeded", "failed", "cancelled"), timeout=30,
                          token=token)
            assert done["state"] == "succeeded", (done, worker.output())
            assert [x["holder"] for x in done["attempts"]] == ["stayer"], done
            assert len(attempts_of(records, job_id)) == 1
        check_no_overlap(records, [short_, long_])
        # And the worker takes new work from it.
        code, _, after = call(a.url, "POST", "/v1/jobs", token, {"command": ["true"]})
        done = a.wait(after["id"], ("succeeded", "failed", "cancelled"), token=token)
        assert (done["state"], done["worker"]) == ("succeeded", "stayer"), worker.output()
    finally:
        worker.kill()
        a.stop()


@pytest.fixture
def two_on_one_database(make_daemon, token_file, tmp_path, lease_key):
    """Make in-process dispatchers on one PostgreSQL database that serve
    workers, each with its own data directory and the shared lease key."""
    async def make(name, worker_lease_seconds):
        data = tmp_path / name
        data.mkdir(mode=0o700)
        key = data / "lease.key"
        key.write_text(lease_key)
        key.chmod(0o600)
        # (Dropped with the test's other databases, once its daemons stop.)
        url = database_for(tmp_path, "shared")
        ini = (f"[executor]\nslots = 0\n[store]\nurl = {url}\n"
               f"[workers]\ntoken_file = {token_file}\n"
               f"lease_seconds = {worker_lease_seconds}\nfence_margin = 0.5\n")
        return await make_daemon(ini, data_dir=data)

    return make


@pytest_twisted.ensureDeferred
async def test_the_dispatcher_a_worker_left_does_not_expire_its_lease(
        two_on_one_database):
    """A worker leased a job from dispatcher a and then heartbeats b alone
    (it moved): b takes the lease up, and when a's copy runs out (a's
    leases live 2 s) a's expiry is refused, changes nothing and is
    forgotten; the job runs on, its result through b is recorded, its one
    attempt succeeded.  Then the worker moves back to a: b's copy is the
    stale one, refused in turn."""
    from tests.test_leases import heartbeat, lease, report, result, worker

    a = await two_on_one_database("a", 2)
    b = await two_on_one_database("b", 30)
    who = worker("mover", slots=2)
    # (Not its last attempt: a last one waits longer for a silent worker.)
    first = await a.submit({"command": ["sleep", "100"], "max_attempts": 2})
    (granted,) = await lease(a, who)
    assert granted["job_id"] == first["id"]
    code, answer = await heartbeat(b, who, [granted], running=True)
    assert code == 200 and answer["leases"][0]["ok"] is True, answer
    hub_a = a.service.dispatcher.hub
    assert first["id"] in b.service.dispatcher.hub.leases
    deadline = time.monotonic() + 15
    while first["id"] in hub_a.leases:
        assert time.monotonic() < deadline, "a never let go of its copy"
        await sleep(0.1)
    assert hub_a.leases_expired == 1
    code, job = await b.json("GET", f"/v1/jobs/{first['id']}")
    assert (job["state"], len(job["attempts"])) == ("running", 1), job
    code, answer = await report(b, who, [result(granted)])
    assert code == 200, answer
    code, job = await a.json("GET", f"/v1/jobs/{first['id']}")
    assert job["state"] == "succeeded" and len(job["attempts"]) == 1, job
    assert job["attempts"][0]["error"] is None
    # And the other way: a lease b granted, the worker moved to a, which
    # takes it up at the heartbeat and records the result.
    second = await b.submit({"command": ["sleep", "100"], "max_attempts": 1})
    (again,) = await lease(b, who)
    code, answer = await heartbeat(a, who, [again], running=True)
    assert code == 200 and answer["leases"][0]["ok"] is True, answer
    assert second["id"] in hub_a.leases
    code, answer = await report(a, who, [result(again)])
    assert code == 200, answer
    code, job = await b.json("GET", f"/v1/jobs/{second['id']}")
    assert job["state"] == "succeeded" and len(job["attempts"]) == 1, job


class SlowReceiver:
    """A real HTTP server on 127.0.0.1 that takes half a second to answer
    each post (200) and counts the posts of each event id: two dispatchers
    that read one delivery at once would both be trying it meanwhile."""

    def __init__(self):
        import http.server
        import threading

        self.posts = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(0.5)
                with receiver.lock:
                    event = self.headers["Dispatcher-Event-Id"]
                    receiver.posts[event] = receiver.posts.get(event, 0) + 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def counts(self):
        with self.lock:
            return dict(self.posts)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_two_dispatchers_send_each_webhook_once(tmp_path, database):
    """Two dispatchers on one database both read the webhook outbox every
    50 ms; each delivery is claimed in the store by the one that reads it,
    so each job's final state is posted once, never by both (the receiver
    takes half a second a post: a delivery read by both would be posted
    twice)."""
    from tests.test_webhooks_daemon import FAST

    secret = tmp_path / "webhook.secret"
    secret.write_text("integration-webhook-secret-0123456789\n")
    secret.chmod(0o600)
    admin_file, token = shared_token(tmp_path)
    receiver = SlowReceiver()
    daemons = []
    try:
        for name in ("a", "b"):
            ini = (FAST.format(secret=secret)
                   + "[fetch]\nallow = 127.0.0.1/32\n[executor]\nslots = 4\n"
                   + f"[dispatcher]\nname = {name}\n"
                   + f"[store]\nurl = {database}\nlease_seconds = 3\n"
                   + f"[api]\ntoken_file = {admin_file}\n")
            workdir = tmp_path / name
            workdir.mkdir()
            daemon = Twistd(str(workdir), ini)
            daemons.append(daemon)
            daemon.start()
        jobs = []
        for i in range(16):
            code, _, job = call(daemons[i % 2].url, "POST", "/v1/jobs", token,
                                {"command": ["true"], "notify": {"url": receiver.url}})
            assert code == 201, job
            jobs.append(job["id"])
        for job_id in jobs:
            daemons[0].wait(job_id, ("succeeded",), token=token)
        poll(lambda: len(receiver.counts()) == len(jobs), timeout=30,
             what="a post of every job's final state")
        # Long enough for a second reader's repeat to arrive.
        time.sleep(1.5)
        counts = receiver.counts()
        assert len(counts) == len(jobs)
        assert set(counts.values()) == {1}, counts
    finally:
        for daemon in daemons:
            daemon.stop()
        receiver.close()


def test_a_worker_that_reaches_no_dispatcher_past_its_fence_stops_its_jobs(
        tmp_path, database, token_file, lease_key):
    """A worker given two dispatchers loses both: the one it talks to is
    killed with SIGKILL, and the other is cut off from it (a TCP proxy the
    test holds) for longer than its fence.  It stops its jobs at its fence;
    the other dispatcher records their attempts lost once their leases
    expire and queues them again; when the cut ends the worker moves there,
    its late word about the old attempts is refused, and it runs the next
    attempts: each job succeeds on its second attempt, and no attempt of a
    job overlapped another."""
    from tests.postgres import Proxy

    records = str(tmp_path / "records")
    os.mkdir(records)
    admin_file, token = shared_token(tmp_path)
    a = dispatcher(str(tmp_path), "a", database, admin_file, token_file, lease_key)
    b = dispatcher(str(tmp_path), "b", database, admin_file, token_file, lease_key)
    a.start()
    b.start()
    proxy = Proxy(("127.0.0.1", int(b.url.rsplit(":", 1)[1])))
    worker = WorkerProcess(tmp_path, a.url, token_file, slots=2, name="cutoff",
                           ini=TEST_TASKS + "\n[executor]\nkill_grace = 0.5\n")
    worker.args += ["--url", f"http://127.0.0.1:{proxy.port}"]
    worker.start()
    try:
        jobs = []
        for _ in range(2):
            body = dict(job_body(records, 12), max_attempts=3, retry_delay=0)
            code, _, job = call(a.url, "POST", "/v1/jobs", token, body)
            assert code == 201, job
            jobs.append(job["id"])
        poll(lambda: running_on(b.url, token, jobs, "cutoff")
             and all(os.path.exists(os.path.join(records, j)) for j in jobs),
             what="both jobs running on the worker", timeout=30)
        proxy.set_cut(True)
        assert a.kill(signal.SIGKILL) == -signal.SIGKILL
        # Stopped at its fence (7 s after its last acknowledged heartbeat),
        # while no dispatcher hears from it.
        poll(lambda: worker.output().count("no heartbeat was acknowledged") >= 2,
             what="the worker's fence", timeout=20)
        # b records the attempts lost once their leases expire, and queues
        # the jobs again; only then does the worker get through.
        for job_id in jobs:
            poll(lambda: call(b.url, "GET", f"/v1/jobs/{job_id}", token)[2]["state"]
                 == "queued", what="the lost attempt's job queued again", timeout=30)
        proxy.set_cut(False)
        for job_id in jobs:
            done = b.wait(job_id, ("succeeded", "failed", "cancelled"), timeout=60,
                          token=token)
            assert done["state"] == "succeeded", (done, worker.output())
            assert [x["holder"] for x in done["attempts"]] == ["cutoff", "cutoff"]
            assert done["attempts"][0]["error"].startswith("lost: its lease expired")
            runs = sorted(attempts_of(records, job_id), key=lambda run: run[1])
            # The first killed at the fence (it never wrote its end), the
            # second whole.
            assert [end is None for _, _, end in runs] == [True, False], runs
        check_no_overlap(records, jobs)
    finally:
        worker.kill()
        proxy.close()
        a.stop()
        b.stop()
