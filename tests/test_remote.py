"""
Remote workers end to end (issue 5): real `dispatcher worker` processes on
loopback against a real `twistd -n dispatcher` process, stopped, killed and
restarted with real signals.

Leases last 2 s here, so an expiry takes seconds; the expiry runs on the
dispatcher's real clock, so every wait polls a condition under a deadline.
"""

import os
import signal
import time
import urllib.request

import pytest

from .conftest import TEST_TASKS, WORKER_TOKEN, poll
from .test_twistd import Twistd, alive
from .test_worker import WorkerProcess

TOKEN = WORKER_TOKEN
LEASE_SECONDS = 2



def pure_twistd(tmp_path, token_file, workers):
    """A started twistd dispatcher that runs nothing itself and takes
    workers, with C{workers} added to its [workers] section."""
    daemon = Twistd(
        str(tmp_path),
        f"[executor]\nslots = 0\n\n[workers]\ntoken_file = {token_file}\n{workers}")
    daemon.start()
    return daemon


@pytest.fixture
def dispatcher(tmp_path, token_file):
    """A started twistd dispatcher that runs nothing itself, takes workers
    and gives them short leases; killed at teardown."""
    daemon = pure_twistd(tmp_path, token_file, f"lease_seconds = {LEASE_SECONDS}\n")
    yield daemon
    daemon.stop()


@pytest.fixture
def start_worker(tmp_path, token_file):
    """Start worker processes (extra options override the defaults of
    WorkerProcess); all are killed at teardown."""
    started = []

    def start(url, name, slots=1, *extra, ini=TEST_TASKS):
        worker = WorkerProcess(tmp_path, url, token_file, slots=slots, name=name, ini=ini)
        worker.args += list(extra)
        started.append(worker.start())
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None:
            # A worker a test left stopped cannot die of SIGKILL until it
            # is continued.
            worker.process.send_signal(signal.SIGCONT)
        worker.kill()


def submit(daemon, body):
    code, job = daemon.request("POST", "/v1/jobs", body)
    assert code == 201, job
    return job


def get(daemon, job_id):
    code, job = daemon.request("GET", f"/v1/jobs/{job_id}")
    assert code == 200, job
    return job


def log_of(daemon, job_id):
    """The latest attempt's stdout, as text (the log endpoint is not JSON)."""
    request = urllib.request.Request(f"{daemon.url}/v1/jobs/{job_id}/log",
                                     headers={"Authorization": f"Bearer {daemon.token}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.read().decode()


def read_pid(path):
    """The process id a job wrote to path, once it has."""
    text = poll(lambda: path.exists() and path.read_text().strip(),
                what=f"a pid in {path}")
    return int(text)


def test_jobs_go_to_the_workers_whose_resources_and_labels_fit(
        dispatcher, start_worker, tmp_path):
    """Each job runs on the worker whose labels meet its requirements and
    whose free resources cover what it asks for: a worker with 1 CPU runs
    two 1-CPU jobs one after the other although it has 2 slots, and a job
    no worker can take stays queued, saying why."""
    a = start_worker(dispatcher.url, "node-a", 2, "--cpus", "1", "--label", "site=a")
    b = start_worker(dispatcher.url, "node-b", 2, "--cpus", "4", "--gpus", "1",
                     "--label", "site=b")
    # The job prints its working directory, which is under the data dir of
    # the worker that really ran it.
    pwd = ["sh", "-c", "pwd; sleep 0.5"]
    expected = {
        "a1": ({"requirements": {"site": "a"}, "resources": {"cpus": 1}}, "node-a"),
        "a2": ({"requirements": {"site": "a"}, "resources": {"cpus": 1}}, "node-a"),
        "b-label": ({"requirements": {"site": "b"}}, "node-b"),
        "b-cpus": ({"resources": {"cpus": 3}}, "node-b"),
        "b-gpu": ({"resources": {"gpus": 1}}, "node-b"),
    }
    jobs = {name: submit(dispatcher, {"command": pwd, "name": name, **fields})
            for name, (fields, _) in expected.items()}
    nowhere = submit(dispatcher, {"command": ["true"],
                                  "requirements": {"site": "c"}})
    done = {}
    for name, job in jobs.items():
        done[name] = dispatcher.wait(job["id"], ("succeeded", "failed", "cancelled"))
        worker = expected[name][1]
        assert done[name]["state"] == "succeeded", (done[name], a.output(), b.output())
        assert done[name]["worker"] == worker, name
        assert [at["holder"] for at in done[name]["attempts"]] == [worker]
        workdir = log_of(dispatcher, job["id"]).strip()
        assert workdir.startswith(str(tmp_path / worker / "data") + os.sep), workdir
    # node-a has one CPU: its two 1-CPU jobs did not overlap.
    first, second = sorted([done["a1"], done["a2"]], key=lambda j: j["started_at"])
    assert first["finished_at"] <= second["started_at"]
    left = get(dispatcher, nowhere["id"])
    assert left["state"] == "queued"
    assert "node-a lacks the label site=c" in left["wait_reason"]
    assert "node-b lacks the label site=c" in left["wait_reason"]
    assert left["attempts"] == []


def attempt_log(data_dir, job_id, attempt, stream="stdout"):
    """An attempt's log file under a data dir (the dispatcher's or a
    worker's), as text."""
    [path] = data_dir.glob(f"jobs/*/*/*/*/{job_id}/attempt-{attempt}/{stream}")
    return path.read_text()


def gated(gates, *lines):
    """A shell script that echoes its first line, waits for the file named
    after its attempt in gates, then echoes the rest: the test decides
    when each attempt ends."""
    first, *rest = lines
    return ["sh", "-c", f'echo "{first}"; '
            f'while [ ! -e {gates}/$DISPATCHER_ATTEMPT ]; do sleep 0.05; done; '
            + "".join(f'echo "{line}"; ' for line in rest)]


def test_a_stopped_worker_loses_its_job_and_its_late_writes(
        dispatcher, start_worker, tmp_path):
    """A worker stopped with SIGSTOP past its lease loses the job to another
    worker; once continued it hears that its lease is gone, nothing it
    sends about the old lease is recorded (neither the output its job
    wrote meanwhile nor its result), and the job ends with the second
    worker's attempt."""
    gates = tmp_path / "gates"
    gates.mkdir()
    # Two slots each: the stopped worker keeps a long-poll open for its
    # free slot, which must not swallow the job it lost.
    workers = {name: start_worker(dispatcher.url, name, 2) for name in ("w1", "w2")}
    job = submit(dispatcher, {
        "command": gated(gates, "attempt $DISPATCHER_ATTEMPT", "end $DISPATCHER_ATTEMPT"),
        "max_attempts": 2})
    # Running, and its output shipped: the first worker really runs it.
    poll(lambda: log_of(dispatcher, job["id"]) == "attempt 1\n",
         what="the first attempt's output")
    first = workers[get(dispatcher, job["id"])["worker"]]
    [second] = [w for w in workers.values() if w is not first]
    first.process.send_signal(signal.SIGSTOP)
    try:
        # The first attempt writes more and ends while its worker is
        # stopped, which then has late output and a result to send.
        (gates / "1").touch()
        poll(lambda: attempt_log(first.dir / "data", job["id"], 1) == "attempt 1\nend 1\n",
             what="the first attempt to end")
        def moved_to_second():
            now = get(dispatcher, job["id"])
            return now["worker"] == second.name and now["state"] == "running" and now

        moved = poll(moved_to_second, what="the job to move")
        assert [a["holder"] for a in moved["attempts"]] == [first.name, second.name]
        lost = moved["attempts"][0]
        assert f"its worker {first.name} sent no heartbeat" in lost["error"]
        assert lost["exit_code"] is None
    finally:
        first.process.send_signal(signal.SIGCONT)
    # Its heartbeat, its late output or its result (whichever reaches the
    # dispatcher first: the order of the requests a worker had queued while
    # stopped is the connection pool's) is refused.
    refusal = (f"job {job['id']} attempt 1: the lease is no longer current (expired",
               f"job {job['id']} attempt 1: the lease is no longer current (stale_lease: "
               "token: the lease expired",
               f"job {job['id']} attempt 1: result refused (expired")
    poll(lambda: any(line in first.output() for line in refusal),
         what="the first worker to hear its lease is gone")
    (gates / "2").touch()
    done = dispatcher.wait(job["id"], ("succeeded", "failed", "cancelled"))
    assert done["state"] == "succeeded", (done, first.output(), second.output())
    assert done["worker"] == second.name
    assert [a["holder"] for a in done["attempts"]] == [first.name, second.name]
    # The first attempt's record is the expiry's, not its worker's late
    # result; the job's exit code and output are the second attempt's.
    assert done["attempts"][0]["exit_code"] is None
    assert "no heartbeat" in done["attempts"][0]["error"]
    assert done["attempts"][1]["exit_code"] == 0
    assert done["exit_code"] == 0
    assert log_of(dispatcher, job["id"]) == "attempt 2\nend 2\n"
    assert f"job {job['id']} attempt 1: result recorded" not in first.output()
    # The second worker logs the answer to its report once it reads it: on
    # a busy host, after the dispatcher already shows the job succeeded.
    poll(lambda: f"job {job['id']} attempt 2: result recorded" in second.output(),
         what="the second worker to log its result recorded")
    # The late line is in the first worker's copy of the log, never in the
    # dispatcher's.
    assert attempt_log(tmp_path / "data", job["id"], 1) == "attempt 1\n"
    # The continued worker is healthy: with the other one gone, it takes
    # and runs a new job.
    assert second.stop() in (0, -signal.SIGTERM)
    after = submit(dispatcher, {"command": ["true"]})
    done = dispatcher.wait(after["id"], ("succeeded", "failed", "cancelled"))
    assert (done["state"], done["worker"]) == ("succeeded", first.name), first.output()


def test_a_killed_workers_job_is_retried_elsewhere(
        dispatcher, start_worker, tmp_path):
    """A worker killed with SIGKILL mid-job takes its job's processes with
    it, and after its lease runs out the job runs again on another worker."""
    workers = {name: start_worker(dispatcher.url, name, 2) for name in ("k1", "k2")}
    pids = tmp_path / "pids"
    pids.mkdir()
    job = submit(dispatcher, {"command": [
        "sh", "-c", f'echo $$ > {pids}/$DISPATCHER_ATTEMPT; '
        'if [ "$DISPATCHER_ATTEMPT" = 1 ]; then sleep 60; fi'],
        "max_attempts": 2})
    running = dispatcher.wait(job["id"], ("running",))
    pid = read_pid(pids / "1")
    victim = workers[running["worker"]]
    [survivor] = [w for w in workers.values() if w is not victim]
    victim.kill()
    # Its spawner helper sees it die and kills the job's process group.
    poll(lambda: not alive(pid), timeout=10, what="the orphaned job to be killed")
    done = dispatcher.wait(job["id"], ("succeeded", "failed", "cancelled"))
    assert done["state"] == "succeeded", (done, survivor.output())
    assert done["worker"] == survivor.name
    assert [a["holder"] for a in done["attempts"]] == [victim.name, survivor.name]
    assert f"its worker {victim.name} sent no heartbeat" in done["attempts"][0]["error"]
    assert (pids / "2").exists()


def test_cancel_kills_a_remote_jobs_process_group(dispatcher, start_worker, tmp_path):
    """Cancelling a job a worker runs stops its whole process group on the
    worker's host: the shell and the child it started in the background
    are gone within a bounded wait, and the job is cancelled."""
    worker = start_worker(dispatcher.url, "c1", 1)
    pids = tmp_path / "pids"
    pids.mkdir()
    job = submit(dispatcher, {"command": [
        "sh", "-c", f"sleep 300 & echo $! > {pids}/child; echo $$ > {pids}/shell; wait"]})
    dispatcher.wait(job["id"], ("running",))
    shell, child = read_pid(pids / "shell"), read_pid(pids / "child")
    assert alive(shell) and alive(child)
    code, answer = dispatcher.request("POST", f"/v1/jobs/{job['id']}/cancel")
    assert code == 202, answer
    # The worker hears of it at its next heartbeat (every 2/3 s here); the
    # group gets SIGTERM, which ends both.
    poll(lambda: not alive(shell) and not alive(child), timeout=10,
         what="the job's processes to end")
    done = dispatcher.wait(job["id"], ("succeeded", "failed", "cancelled"))
    assert done["state"] == "cancelled", (done, worker.output())
    assert done["worker"] == "c1"
    assert f"job {job['id']} attempt 1: the lease is no longer current (cancelled" in (
        worker.output())


@pytest.fixture
def restartable(tmp_path, token_file):
    """A dispatcher like the one above, but whose workers may go 11 s
    unheard before they stop their jobs (12 s leases, a 1 s fence margin):
    room for a restart."""
    daemon = Twistd(
        str(tmp_path),
        f"[executor]\nslots = 0\n\n[workers]\ntoken_file = {token_file}\n"
        "lease_seconds = 12\nfence_margin = 1\n")
    daemon.start()
    yield daemon
    daemon.stop()


def test_a_restarted_dispatcher_keeps_its_workers_jobs(
        restartable, start_worker, tmp_path):
    """A dispatcher killed with SIGKILL while a worker runs two jobs, and
    restarted on the same data dir and port before the worker's fence
    (docs/worker-protocol.md, "Self-fencing"), takes the worker back: the
    job that ended while it was down has its result recorded, the one that
    went on running succeeds after the restart, each with its one attempt
    and its whole output, and the worker takes new work.  (A dispatcher
    down past the fence finds the jobs stopped: see test_fence.py.)"""
    dispatcher = restartable
    gates = tmp_path / "gates"
    gates.mkdir()
    (gates / "during").mkdir()
    (gates / "after").mkdir()
    # A short kill grace: the fence's SIGTERM, that long before it, comes
    # later.
    worker = start_worker(dispatcher.url, "r1", 2,
                          ini=TEST_TASKS + "\n[executor]\nkill_grace = 0.5\n")
    pidfile = tmp_path / "pid"
    through = submit(dispatcher, {"command": [
        "sh", "-c", f"echo $$ > {pidfile}; " + gated(gates / "after", "start", "end")[2]]})
    during = submit(dispatcher, {"command": gated(gates / "during", "start", "end")})
    for job in (through, during):
        poll(lambda: log_of(dispatcher, job["id"]) == "start\n",
             what="the jobs' first output")
    pid = read_pid(pidfile)
    port = dispatcher.url.rsplit(":", 1)[1]
    assert dispatcher.kill(signal.SIGKILL) == -signal.SIGKILL
    killed = time.monotonic()
    (gates / "during" / "1").touch()
    # Down with the worker trying to reach it (the ended job's last output
    # goes before its result, so it is the log that fails first): the
    # downtime must not count against the worker.
    poll(lambda: time.monotonic() - killed > 1.0
         and f"job {during['id']}: shipping its stdout failed" in worker.output(),
         what="downtime the worker saw")
    assert f"job {during['id']} attempt 1 ended: succeeded" in worker.output()
    assert alive(pid)
    dispatcher.listen = f"tcp:{port}:interface=127.0.0.1"
    dispatcher.start()
    assert dispatcher.url.endswith(f":{port}")
    (gates / "after" / "1").touch()
    for job in (during, through):
        done = dispatcher.wait(job["id"], ("succeeded", "failed", "cancelled"))
        assert done["state"] == "succeeded", (done, worker.output())
        assert done["exit_code"] == 0
        assert [a["holder"] for a in done["attempts"]] == ["r1"]
        assert done["worker"] == "r1"
        assert log_of(dispatcher, job["id"]) == "start\nend\n"
        # Logged once the worker reads the answer to its report, which may
        # be a little after the dispatcher shows the job succeeded.
        poll(lambda: f"job {job['id']} attempt 1: result recorded" in worker.output(),
             what=f"the worker to log job {job['id']}'s result recorded")
    # And it takes new work from the restarted dispatcher.
    after = submit(dispatcher, {"command": ["true"]})
    done = dispatcher.wait(after["id"], ("succeeded", "failed", "cancelled"))
    assert (done["state"], done["worker"]) == ("succeeded", "r1"), worker.output()


def job_dir(data_dir, job_id):
    """A job's directory under a worker's data dir, or None."""
    found = list(data_dir.glob(f"jobs/*/*/*/*/{job_id}"))
    return found[0] if found else None


def test_a_worker_removes_its_jobs_directories_once_old_after_a_restart_too(
        dispatcher, start_worker, tmp_path):
    """A worker keeps its jobs' directories for --keep-days after the
    dispatcher accepted their results: a restarted one with a short age
    finds what its earlier run left and removes it, never removes a
    running job's directory however old, removes that one too once its
    result is accepted and the age has passed, leaves no empty window
    directories; and a second worker on the same data directory is
    refused."""
    worker = start_worker(dispatcher.url, "node-a", 2, "--keep-days", "none")
    data = worker.dir / "data"
    first = submit(dispatcher, {"command": ["sh", "-c", "echo first"]})
    assert dispatcher.wait(first["id"], ("succeeded", "failed"))["state"] == "succeeded"
    assert job_dir(data, first["id"]) is not None
    assert worker.stop() in (0, -signal.SIGTERM), worker.output()
    # Kept for ever by that run: still there after it stopped.
    left = job_dir(data, first["id"])
    assert left is not None
    # Restarted with 2.6 s.
    worker.args[worker.args.index("none")] = "0.00003"
    worker.start()
    poll(lambda: "asks" in worker.output().split("worker node-a stopped")[-1],
         what="the restart")
    second = WorkerProcess(tmp_path, dispatcher.url, worker.args[
        worker.args.index("--token-file") + 1], name="node-b")
    second.args += ["--data-dir", str(data)]
    second.start()
    try:
        assert second.process.wait(timeout=60) != 0
        assert f"the data directory {data} is in use by another worker" in second.output()
        assert "Traceback" not in second.output()
    finally:
        second.kill()
    poll(lambda: not left.exists(), timeout=20, what="the earlier run's directory to go")
    running = submit(dispatcher, {"command": ["sh", "-c", "echo running; sleep 6"]})
    poll(lambda: get(dispatcher, running["id"])["state"] == "running", what="the job to run")
    path = poll(lambda: job_dir(data, running["id"]), what="the running job's directory")
    # Older than the age (2.6 s, passes every second) while it runs: kept.
    time.sleep(4.5)
    assert get(dispatcher, running["id"])["state"] == "running"
    assert path.exists()
    assert dispatcher.wait(running["id"], ("succeeded", "failed"))["state"] == "succeeded"
    poll(lambda: not path.exists(), timeout=20, what="the finished job's directory to go")
    assert log_of(dispatcher, running["id"]) == "running\n"
    # The emptied window directories go right after it, in the same step
    # (a look between the two found one still there under load).
    poll(lambda: os.listdir(data / "jobs") == [], timeout=20,
         what="the emptied window directories to go")
    assert "removed 1 job directories" in worker.output()
