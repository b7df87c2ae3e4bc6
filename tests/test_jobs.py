"""
Jobs running end to end in a real daemon: real processes through the
spawner, real task threads.
"""

import hashlib
import os
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.web.server import Site
from twisted.web.static import File
from twisted.internet.defer import ensureDeferred, gatherResults

from .conftest import sleep, until
from .postgres import one_dispatcher_only, sqlite_file_only


@pytest_twisted.ensureDeferred
async def test_command_succeeds_with_output(daemon):
    """A command job runs, its stdout is its log, and it ends succeeded with exit 0."""
    job = await daemon.submit({"command": ["sh", "-c", "echo out; echo err >&2"]})
    done = await daemon.wait(job["id"])
    assert done["state"] == "succeeded", done
    assert done["exit_code"] == 0
    assert done["started_at"] and done["finished_at"]
    (attempt,) = done["attempts"]
    assert attempt["number"] == 1 and attempt["exit_code"] == 0
    assert attempt["holder"].startswith("local@")
    response, out = await daemon.request("GET", f"/v1/jobs/{job['id']}/log")
    assert response.code == 200 and out == b"out\n"
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
    _, err = await daemon.request("GET", f"/v1/jobs/{job['id']}/log?stream=stderr")
    assert err == b"err\n"
    code, error = await daemon.json("GET", f"/v1/jobs/{job['id']}/log?stream=other")
    assert code == 400 and error["error"]["field"] == "stream"


@pytest_twisted.ensureDeferred
async def test_command_fails_and_signals(daemon):
    """A non-zero exit fails the job with that code; a signal gives its negative."""
    job = await daemon.submit({"command": ["sh", "-c", "exit 3"]})
    done = await daemon.wait(job["id"])
    assert done["state"] == "failed"
    assert done["exit_code"] == 3
    assert "3" in done["error"]
    job = await daemon.submit({"command": ["sh", "-c", "kill -9 $$"]})
    done = await daemon.wait(job["id"])
    assert done["state"] == "failed" and done["exit_code"] == -9
    assert "signal 9" in done["error"]


@pytest_twisted.ensureDeferred
async def test_command_not_found(daemon):
    """A command that cannot start fails the job with a reason naming it."""
    job = await daemon.submit({"command": ["no-such-program-xyz"]})
    done = await daemon.wait(job["id"])
    assert done["state"] == "failed"
    assert "no-such-program-xyz" in done["error"]


@pytest_twisted.ensureDeferred
async def test_clean_environment(daemon, monkeypatch):
    """A command sees a clean base environment, its own env and the job's ids,
    never the daemon's environment."""
    os.environ["DISPATCHER_TEST_SECRET"] = "leak"
    try:
        job = await daemon.submit({"command": ["env"], "env": {"MINE": "yes"}})
        done = await daemon.wait(job["id"])
    finally:
        del os.environ["DISPATCHER_TEST_SECRET"]
    _, out = await daemon.request("GET", f"/v1/jobs/{job['id']}/log")
    env = dict(line.split("=", 1) for line in out.decode().splitlines())
    assert "DISPATCHER_TEST_SECRET" not in env
    assert env["MINE"] == "yes"
    assert env["DISPATCHER_JOB_ID"] == job["id"]
    assert env["DISPATCHER_ATTEMPT"] == "1"
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert env["HOME"].endswith(os.path.join(job["id"], "work"))
    assert done["state"] == "succeeded"


@pytest_twisted.ensureDeferred
async def test_log_while_running_and_cancel_kills_tree(daemon, tmp_path):
    """The log can be read while the job runs, and cancel kills the job's whole
    process tree and records it cancelled."""
    pidfile = tmp_path / "grandchild"
    job = await daemon.submit({"command": [
        "sh", "-c",
        f"sleep 300 & echo $! > {pidfile}; echo started; wait"]})
    for _ in range(500):
        _, out = await daemon.request("GET", f"/v1/jobs/{job['id']}/log")
        if out == b"started\n" and pidfile.exists() and pidfile.read_text().strip():
            break
        await sleep(0.01)
    assert out == b"started\n"
    grandchild = int(pidfile.read_text())
    os.kill(grandchild, 0)
    code, answer = await daemon.json("POST", f"/v1/jobs/{job['id']}/cancel")
    assert code == 202 and answer["state"] == "running"
    done = await daemon.wait(job["id"])
    assert done["state"] == "cancelled"
    assert done["exit_code"] == -15
    for _ in range(200):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        await sleep(0.01)
    else:
        raise AssertionError("the grandchild survived the cancel")


@pytest_twisted.ensureDeferred
async def test_task_result_and_context(daemon):
    """A task runs on the task pool with a context, and its return value is the
    job's result."""
    job = await daemon.submit({"task": "add", "args": [2, 3]})
    done = await daemon.wait(job["id"])
    assert done["state"] == "succeeded" and done["result"] == 5
    assert done["exit_code"] is None
    job = await daemon.submit({"task": "describe", "args": [1], "kwargs": {"k": "v"},
                               "labels": {"a": "b"}})
    done = await daemon.wait(job["id"])
    result = done["result"]
    assert result["job_id"] == job["id"] and result["attempt"] == 1
    assert result["labels"] == {"a": "b"}
    assert result["args"] == [1] and result["kwargs"] == {"k": "v"}
    assert "dispatcher-tasks" in result["thread"]


@pytest_twisted.ensureDeferred
async def test_free_slot_claims_in_the_submission_commit(daemon):
    """A job submitted while a slot is free is claimed in the transaction that
    stores it, and no needless claim follows: storing, starting and finishing
    a task take two commits."""
    one_dispatcher_only("it counts a job's commits; a shared database's lease renewals "
                        "commit too")
    store = daemon.service.store
    for n in range(3):
        before = store.batches
        job = await daemon.submit({"task": "add", "args": [n, 1]})
        done = await daemon.wait(job["id"])
        assert done["result"] == n + 1
        assert store.batches - before == 2


@pytest_twisted.ensureDeferred
async def test_ends_of_jobs_running_together_share_one_commit(make_daemon):
    """A local job that ends while others run waits for them (up to
    end_gather) and all are recorded in one commit, with each one's own end
    time; until then each still shows running."""
    daemon = await make_daemon("[executor]\nslots = 3\nthreads = 3\n")
    dispatcher = daemon.service.dispatcher
    dispatcher.end_gather = 60.0  # only the last end can record them
    store = daemon.service.store
    jobs = [await daemon.submit({"task": "wait_for_cancel", "args": [60]})
            for _ in range(3)]
    for job in jobs:
        await daemon.wait(job["id"], states=("running",))
    for job in jobs[:2]:
        code, _ = await daemon.json("POST", f"/v1/jobs/{job['id']}/cancel")
        assert code == 202
    while len(dispatcher._ending) < 2:
        await sleep(0.01)
    for job in jobs:
        _, seen = await daemon.json("GET", f"/v1/jobs/{job['id']}")
        assert seen["state"] == "running"
    # A write asked for now commits after every write asked for before it:
    # none of those may land in the count below.
    await store.purge_idempotency(0.0)
    before = store.batches
    code, _ = await daemon.json("POST", f"/v1/jobs/{jobs[2]['id']}/cancel")
    assert code == 202
    done = [await daemon.wait(job["id"]) for job in jobs]
    assert [job["state"] for job in done] == ["cancelled"] * 3
    # The cancel's own commit, then one for the three ends.
    assert store.batches - before == 2
    # Each keeps the time it ended, not the time of the commit.
    assert done[0]["finished_at"] < done[2]["finished_at"]
    assert done[1]["finished_at"] < done[2]["finished_at"]


@pytest_twisted.ensureDeferred
async def test_an_end_does_not_wait_for_a_long_job(make_daemon):
    """With a job running for a minute beside it, a short job is recorded
    after end_gather, not when the long one ends."""
    daemon = await make_daemon("[executor]\nslots = 2\nthreads = 2\n")
    long = await daemon.submit({"task": "wait_for_cancel", "args": [60]})
    await daemon.wait(long["id"], states=("running",))
    short = await daemon.submit({"task": "add", "args": [1, 2]})
    done = await daemon.wait(short["id"])
    assert done["state"] == "succeeded" and done["result"] == 3
    _, seen = await daemon.json("GET", f"/v1/jobs/{long['id']}")
    assert seen["state"] == "running"
    await daemon.json("POST", f"/v1/jobs/{long['id']}/cancel")
    assert (await daemon.wait(long["id"]))["state"] == "cancelled"


@pytest_twisted.ensureDeferred
async def test_task_failures(daemon):
    """A task that raises or returns a value that is not JSON fails with words;
    the traceback is its stderr log."""
    job = await daemon.submit({"task": "fail", "args": ["boom"]})
    done = await daemon.wait(job["id"])
    assert done["state"] == "failed"
    assert "ValueError: boom" in done["error"]
    _, err = await daemon.request("GET", f"/v1/jobs/{job['id']}/log?stream=stderr")
    assert b"Traceback" in err and b"boom" in err
    job = await daemon.submit({"task": "not_json"})
    done = await daemon.wait(job["id"])
    assert done["state"] == "failed" and "not JSON" in done["error"]


@pytest_twisted.ensureDeferred
async def test_cancel_task(daemon):
    """Cancelling a running task sets its context's flag; it ends cancelled."""
    job = await daemon.submit({"task": "wait_for_cancel", "args": [30]})
    await daemon.wait(job["id"], states=("running",))
    code, _ = await daemon.json("POST", f"/v1/jobs/{job['id']}/cancel")
    assert code == 202
    done = await daemon.wait(job["id"])
    assert done["state"] == "cancelled"
    assert done["result"] is None  # a cancelled job keeps no result


@pytest_twisted.ensureDeferred
async def test_five_blocking_tasks_run_together(make_daemon):
    """Five tasks that each block for one second, with five threads, finish
    together in about one second, while the API keeps answering."""
    daemon = await make_daemon("[executor]\nthreads = 5\nslots = 5\n")
    jobs = await gatherResults([
        ensureDeferred(daemon.submit({"task": "block", "args": [1]}))
        for _ in range(5)])
    answered = []
    while True:
        t = time.monotonic()
        code, _ = await daemon.json("GET", "/healthz")
        answered.append(time.monotonic() - t)
        states = [(await daemon.json("GET", f"/v1/jobs/{j['id']}"))[1]["state"]
                  for j in jobs]
        if all(s == "succeeded" for s in states):
            break
        await sleep(0.02)
    # Together, not one after another: every task started before any ended.
    seen = [(await daemon.json("GET", f"/v1/jobs/{j['id']}"))[1] for j in jobs]
    assert max(s["started_at"] for s in seen) < min(s["finished_at"] for s in seen)
    assert max(answered) < 0.5


@pytest_twisted.ensureDeferred
async def test_slots_bound_concurrency(make_daemon, tmp_path):
    """No more jobs run at once than [executor] slots; the rest wait queued
    and run as slots free."""
    daemon = await make_daemon("[executor]\nslots = 2\n")
    marker = tmp_path / "running"
    marker.mkdir()
    script = (f"touch {marker}/$DISPATCHER_JOB_ID; "
              f"n=$(ls {marker} | wc -l); echo $n; sleep 0.2; "
              f"rm {marker}/$DISPATCHER_JOB_ID")
    jobs = [await daemon.submit({"command": ["sh", "-c", script]}) for _ in range(6)]
    for job in jobs:
        done = await daemon.wait(job["id"])
        assert done["state"] == "succeeded"
        _, out = await daemon.request("GET", f"/v1/jobs/{job['id']}/log")
        assert int(out) <= 2


# The test servers listen on 127.0.0.1, which inputs are not fetched from
# unless [fetch] allow names it.
ALLOW_LOOPBACK = "[fetch]\nallow = 127.0.0.0/8\n"


@pytest.fixture
def file_server(tmp_path):
    """A real local HTTP server of files, on an ephemeral port."""
    root = tmp_path / "served"
    root.mkdir()
    (root / "data.txt").write_bytes(b"payload\n")
    site = Site(File(str(root)))
    port = pytest_twisted.blockon(
        serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site))
    yield f"http://127.0.0.1:{port.getHost().port}"
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_inputs_are_staged_before_the_job(make_daemon, file_server):
    """Inputs are fetched into the job's working directory, checked, and the job
    then runs with them."""
    daemon = await make_daemon(ALLOW_LOOPBACK)
    digest = hashlib.sha256(b"payload\n").hexdigest()
    job = await daemon.submit({
        "command": ["cat", "in/data.txt"],
        "inputs": [{"url": f"{file_server}/data.txt", "path": "in/data.txt",
                    "sha256": digest}]})
    done = await daemon.wait(job["id"])
    assert done["state"] == "succeeded", done
    _, out = await daemon.request("GET", f"/v1/jobs/{job['id']}/log")
    assert out == b"payload\n"
    job = await daemon.submit({
        "task": "read_input", "args": ["x.txt"],
        "inputs": [{"url": f"{file_server}/data.txt", "path": "x.txt"}]})
    done = await daemon.wait(job["id"])
    assert done["result"] == "payload\n"


@pytest_twisted.ensureDeferred
async def test_staging_failure_names_the_input(make_daemon, file_server):
    """A failed input fails the job, before it runs, with an error that names the
    input and says why."""
    daemon = await make_daemon(ALLOW_LOOPBACK)
    job = await daemon.submit({
        "command": ["touch", "ran"],
        "inputs": [{"url": f"{file_server}/data.txt", "path": "a.txt"},
                   {"url": f"{file_server}/data.txt", "path": "b.txt",
                    "sha256": "0" * 64}]})
    done = await daemon.wait(job["id"])
    assert done["state"] == "failed"
    assert "input 1" in done["error"] and "b.txt" in done["error"]
    assert "sha256" in done["error"]
    assert done["attempts"][0]["error"] == done["error"]
    workdir = daemon.service.dispatcher.executor.workdir(job["id"])
    assert not os.path.exists(os.path.join(workdir, "ran"))


@pytest_twisted.ensureDeferred
async def test_large_log_and_offset(daemon):
    """A large log streams whole, and offset returns only what follows it."""
    job = await daemon.submit({"command": ["head", "-c", "3000000", "/dev/zero"]})
    await daemon.wait(job["id"])
    response, out = await daemon.request("GET", f"/v1/jobs/{job['id']}/log")
    assert len(out) == 3000000
    _, tail = await daemon.request("GET", f"/v1/jobs/{job['id']}/log?offset=2999990")
    assert tail == b"\0" * 10
    _, nothing = await daemon.request("GET", f"/v1/jobs/{job['id']}/log?offset=9999999")
    assert nothing == b""
    code, error = await daemon.json("GET", f"/v1/jobs/{job['id']}/log?offset=-1")
    assert code == 400 and error["error"]["field"] == "offset"
    queued = await daemon.submit({"task": "add", "args": [1, 1]})
    _, empty = await daemon.request("GET", f"/v1/jobs/{queued['id']}/log?stream=stderr")
    assert empty == b""


@pytest.fixture
def hanging_server():
    """A local server that accepts a request and never answers."""
    from twisted.internet.protocol import Factory, Protocol

    class Hang(Protocol):
        def dataReceived(self, data):
            pass

    connections = []

    class Track(Factory):
        protocol = Hang

        def buildProtocol(self, addr):
            p = Factory.buildProtocol(self, addr)
            connections.append(p)
            return p

    port = pytest_twisted.blockon(
        serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Track()))
    yield f"http://127.0.0.1:{port.getHost().port}"
    for p in connections:
        if p.transport is not None:
            p.transport.abortConnection()
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_cancel_during_staging(make_daemon, hanging_server):
    """Cancelling a job while its inputs are fetched stops the fetch and the job
    never runs."""
    daemon = await make_daemon(ALLOW_LOOPBACK)
    job = await daemon.submit({
        "command": ["touch", "ran"],
        "inputs": [{"url": f"{hanging_server}/slow", "path": "slow"}]})
    await daemon.wait(job["id"], states=("staging",))
    code, answer = await daemon.json("POST", f"/v1/jobs/{job['id']}/cancel")
    assert code == 202 and answer["state"] == "staging"
    done = await daemon.wait(job["id"], timeout=5)
    assert done["state"] == "cancelled"
    workdir = daemon.service.dispatcher.executor.workdir(job["id"])
    assert not os.path.exists(os.path.join(workdir, "ran"))


@pytest_twisted.ensureDeferred
async def test_client_gone_mid_submit_still_runs(daemon):
    """A submission whose client went away while it committed still runs:
    cancelling the request does not undo what follows the commit."""
    from twisted.internet.defer import CancelledError

    from dispatcher.model._jobs import JobSpec
    from dispatcher.wire._submission import Submission

    d = daemon.service.dispatcher.submit([Submission(JobSpec(task="add", args=(1, 2)))])
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    for _ in range(500):
        code, page = await daemon.json("GET", "/v1/jobs")
        if page["jobs"] and page["jobs"][0]["state"] == "succeeded":
            break
        await sleep(0.01)
    assert page["jobs"][0]["result"] == 3


@pytest_twisted.ensureDeferred
async def test_a_relative_data_dir_runs_commands(make_daemon, tmp_path, monkeypatch):
    """The default data_dir (var) is relative to where the daemon starts;
    commands run all the same (the spawner helper works from /)."""
    monkeypatch.chdir(tmp_path)
    daemon = await make_daemon(data_dir="var")
    code, job = await daemon.json("POST", "/v1/jobs", {"command": ["echo", "hi"]})
    assert code == 201
    done = await daemon.wait(job["id"])
    assert done["state"] == "succeeded", done["error"]
    assert done["exit_code"] == 0
    assert (tmp_path / "var" / "jobs").is_dir()


@pytest_twisted.ensureDeferred
async def test_an_end_the_store_could_not_commit_is_written_again(make_daemon, monkeypatch):
    """A job's end that fails to commit (a full disk) is written again after
    1, 2 and 4 s, until it lands: the job ends with its result, at the time
    it ended rather than that of the write that landed."""
    from twisted.internet.defer import fail
    from twisted.internet.task import Clock

    from dispatcher.store._results import CommitFailed

    clock = Clock()
    clock.advance(1_800_000_000)
    daemon = await make_daemon(clock=clock)
    store = daemon.service.store
    real = store.finish
    failures = []

    def finish(lease, outcome, now):
        if len(failures) < 3:
            failures.append((now, clock.seconds()))
            return fail(CommitFailed("database or disk is full"))
        return real(lease, outcome, now)

    monkeypatch.setattr(store, "finish", finish)
    job = await daemon.submit({"task": "add", "args": [2, 3]})
    await until(lambda: failures)
    clock.advance(1)
    clock.advance(2)
    assert len(failures) == 3
    _, seen = await daemon.json("GET", f"/v1/jobs/{job['id']}")
    # The store still holds it running; the answer says its end waits.
    assert seen["state"] == "running"
    assert seen["wait_reason"] == (
        f"ended (succeeded) at {seen['started_at']}; recording the end waits for "
        "the store: database or disk is full; trying again at "
        "2027-01-15T08:00:07.000000Z"
    )
    clock.advance(4)
    done = await daemon.wait(job["id"])
    assert done["state"] == "succeeded" and done["result"] == 5
    assert done["wait_reason"] is None
    assert [at for _, at in failures] == [1_800_000_000, 1_800_000_001, 1_800_000_003]
    # The end time is the job's, not that of the write that landed.
    assert done_finished(done) == 1_800_000_000


def done_finished(job):
    from datetime import datetime

    return datetime.fromisoformat(job["finished_at"].replace("Z", "+00:00")).timestamp()


@pytest_twisted.ensureDeferred
async def test_a_stop_does_not_wait_for_an_end_that_cannot_be_written(make_daemon, monkeypatch):
    """While the store keeps failing a job's end, a stop gives up on it
    rather than hang; the next start records the attempt as lost."""
    from twisted.internet.defer import fail

    from dispatcher.store._results import CommitFailed

    daemon = await make_daemon()
    # Long enough that the stop comes during a wait: it must not sit it out.
    daemon.service.dispatcher.recorder.retry_first = 600.0
    store = daemon.service.store
    monkeypatch.setattr(
        store, "finish",
        lambda lease, outcome, now: fail(CommitFailed("disk I/O error")))
    job = await daemon.submit({"task": "add", "args": [1, 1]})
    while not daemon.service.dispatcher.recorder.waiting:
        await sleep(0.01)
    data = daemon.service.config.dispatcher.data_dir
    await daemon.service.stopService()
    again = await make_daemon(data_dir=data)
    done = await again.wait(job["id"])
    assert done["state"] == "failed" and "lost" in done["error"]


@pytest_twisted.ensureDeferred
async def test_a_submission_whose_commit_fails_for_a_full_disk_is_a_507(daemon):
    """A COMMIT that fails because the disk is full answers the submission
    507 insufficient_storage and leaves no job behind; one that fails
    otherwise (an I/O error) is a 500; the next commit works as ever."""
    sqlite_file_only()
    import sqlite3

    store = daemon.service.store

    class FailingCommit:
        """The writer's connection, whose next COMMIT fails with error."""

        def __init__(self, conn, error):
            self.conn = conn
            self.error = error
            self.failed = 0

        def execute(self, sql, *args):
            if sql == "COMMIT" and not self.failed:
                self.failed += 1
                raise self.error
            return self.conn.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self.conn, name)

    real = store._writer.connection
    try:
        for error, status, code in [
            (sqlite3.OperationalError("database or disk is full"), 507,
             "insufficient_storage"),
            (sqlite3.OperationalError("disk I/O error"), 500, "internal_error"),
        ]:
            store._writer.connection = failing = FailingCommit(real, error)
            answer_code, answer = await daemon.json("POST", "/v1/jobs", {"command": ["true"]})
            assert answer_code == status and answer["error"]["code"] == code, answer
            assert answer["error"]["field"] is None
            assert failing.failed == 1
            store._writer.connection = real
        code, page = await daemon.json("GET", "/v1/jobs")
        assert code == 200 and page["jobs"] == []
        job = await daemon.submit({"command": ["true"]})
        assert (await daemon.wait(job["id"]))["state"] == "succeeded"
    finally:
        store._writer.connection = real


@pytest_twisted.ensureDeferred
async def test_an_end_is_written_again_for_as_long_as_it_takes(make_daemon, monkeypatch):
    """The wait between writes of a failed end stops doubling at a minute,
    and a thousand failures later the end still lands."""
    from twisted.internet.defer import fail
    from twisted.internet.task import Clock

    from dispatcher.store._results import CommitFailed

    clock = Clock()
    clock.advance(1_800_000_000)
    daemon = await make_daemon(clock=clock)
    store = daemon.service.store
    real = store.finish
    waits = []

    def finish(lease, outcome, now):
        waits.append(clock.seconds())
        if len(waits) <= 1100:
            return fail(CommitFailed("database or disk is full"))
        return real(lease, outcome, now)

    monkeypatch.setattr(store, "finish", finish)
    job = await daemon.submit({"task": "add", "args": [2, 2]})
    await until(lambda: waits)
    while len(waits) <= 1100:
        clock.advance(1)
    gaps = [b - a for a, b in zip(waits, waits[1:])]
    assert gaps[:7] == [1, 2, 4, 8, 16, 32, 60]
    assert set(gaps[7:]) == {60}
    done = await daemon.wait(job["id"])
    assert done["state"] == "succeeded" and done["result"] == 4
