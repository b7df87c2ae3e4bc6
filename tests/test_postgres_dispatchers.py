"""
Several real dispatchers (`twistd -n dispatcher`) on one real PostgreSQL
database: kill -9 of one of two under load, three times, with the other
recovering its jobs once their leases expire; and a partition, one
dispatcher cut from the database for 30 s by a TCP proxy the test holds,
which answers 503, fences its jobs, and serves again once the cut ends.
Every job keeps a record of each attempt (its pid, start and end) and an
exclusive lock while it runs, so that two copies running at once show.
"""

import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import free_port
from tests.postgres import Databases, Proxy, target, through
from tests.test_twistd import Twistd

# Each attempt appends "start TIME PID" and "end TIME PID" to a file of
# its job's, and holds an exclusive lock named after its job while it
# runs: a second copy running at once fails to take it and says so.
SCRIPT = (
    'echo "start $(date +%s.%N) $$" >> "$RECORDS/$DISPATCHER_JOB_ID"; '
    'exec 9>"$RECORDS/$DISPATCHER_JOB_ID.lock"; '
    'flock -n 9 || echo "$DISPATCHER_JOB_ID" >> "$RECORDS/overlaps"; '
    'sleep "$SECONDS_TO_RUN"; '
    'echo "end $(date +%s.%N) $$" >> "$RECORDS/$DISPATCHER_JOB_ID"'
)

LEASE_SECONDS = 3


@pytest.fixture
def database():
    made = Databases()
    yield made.url("db")
    made.drop()



def call(url, method, path, token, body=None, key=None, timeout=10):
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    request = urllib.request.Request(
        url + path, data=None if body is None else json.dumps(body).encode(),
        method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"null")


def dispatcher(root, name, url, port, slots=4, token_file=None, node=None):
    ini = (
        f"[executor]\nslots = {slots}\nkill_grace = 1\n"
        + (f"[dispatcher]\nname = {node}\n" if node else "") +
        f"[store]\nurl = {url}\nlease_seconds = {LEASE_SECONDS}\n"
    )
    if token_file is not None:
        ini += f"[api]\ntoken_file = {token_file}\n"
    os.makedirs(os.path.join(root, name), exist_ok=True)
    return Twistd(os.path.join(root, name), ini, listen=f"tcp:{port}:interface=127.0.0.1")


def attempts_of(records, job_id):
    """The attempts a job's record file holds: (pid, start, end or None)."""
    runs = {}
    with open(os.path.join(records, job_id)) as f:
        for line in f:
            what, at, pid = line.split()
            if what == "start":
                runs[pid] = [float(at), None]
            else:
                runs[pid][1] = float(at)
    return [(pid, start, end) for pid, (start, end) in runs.items()]


def check_no_overlap(records, job_ids):
    """No two attempts of one job ran at once: the locks say so, and the
    attempts that ended (a killed one has no end) are apart in time."""
    assert not os.path.exists(os.path.join(records, "overlaps")), open(
        os.path.join(records, "overlaps")).read()
    for job_id in job_ids:
        runs = sorted(attempts_of(records, job_id), key=lambda run: run[1])
        for (_, start, end), (_, next_start, _) in zip(runs, runs[1:]):
            if end is not None:
                assert end <= next_start, (job_id, runs)


def shared_token(tmp_path):
    path = tmp_path / "admin.token"
    path.write_text("t" * 40 + "\n")
    os.chmod(path, 0o600)
    return str(path), "t" * 40


def all_jobs(url, token):
    jobs, cursor = {}, ""
    while True:
        _, _, page = call(url, "GET", f"/v1/jobs?limit=1000{cursor}", token)
        for job in page["jobs"]:
            jobs[job["id"]] = job
        if not page["next_cursor"]:
            return jobs
        cursor = f"&cursor={page['next_cursor']}"


def test_a_bad_dispatcher_name_is_one_line(tmp_path):
    """A [dispatcher] name that is not a plain name stops the start with one
    line naming the key and what is allowed."""
    daemon = Twistd(str(tmp_path), "[dispatcher]\nname = two words\n")
    with pytest.raises(AssertionError) as failed:
        daemon.start()
    assert "[dispatcher] name = 'two words': expected a name of 1 to 100" in str(failed.value)


def test_each_dispatcher_on_one_database_has_its_own_holder(tmp_path, database):
    """Two dispatchers on one database run jobs under holder names of their
    own (local@HOST-<random>, kept in the data directory), and a restart
    keeps the name; a configured name is used as it is."""
    token_file, token = shared_token(tmp_path)
    a = dispatcher(str(tmp_path), "a", database, free_port(), token_file=token_file)
    b = dispatcher(str(tmp_path), "b", database, free_port(), token_file=token_file,
                   node="bee-1")
    holders = []
    try:
        for daemon in (a, b, a):
            daemon.start()
            code, _, job = call(daemon.url, "POST", "/v1/jobs", token,
                                {"command": ["true"]})
            assert code == 201, job
            done = daemon.wait(job["id"], ("succeeded",), token=token)
            holders.append(done["attempts"][0]["holder"])
            if daemon is a and len(holders) == 1:
                daemon.stop_gracefully()
        assert holders[0] == holders[2]
        assert holders[0].startswith(f"local@{socket.gethostname()}-")
        assert holders[1] == "local@bee-1"
    finally:
        a.stop()
        b.stop()


def test_kill_one_of_two_dispatchers_under_load(tmp_path, database):
    """Two dispatchers on one database under load from clients of both; one
    is killed with SIGKILL three times while jobs run on both, and
    restarted only after the other has recovered its jobs (their leases
    expired): every acknowledged job is there and succeeded, none ran twice
    at once, and the other recorded the killed one's attempts lost."""
    records = str(tmp_path / "records")
    os.mkdir(records)
    token_file, token = shared_token(tmp_path)
    a = dispatcher(str(tmp_path), "a", database, free_port(), token_file=token_file)
    b = dispatcher(str(tmp_path), "b", database, free_port(), token_file=token_file)
    jobs = 400
    acknowledged = {}
    lock = threading.Lock()
    deadline = time.monotonic() + 200
    a.start()
    b.start()
    a_url, b_url = a.url, b.url
    # A's holder name, from a job of its own.
    code, _, first = call(a_url, "POST", "/v1/jobs", token, {"command": ["true"]})
    a_holder = a.wait(first["id"], ("succeeded",), token=token)["attempts"][0]["holder"]
    killed = set()

    def client(number, clients=4):
        for i in range(number, jobs, clients):
            body = {"command": ["sh", "-c", SCRIPT],
                    "env": {"RECORDS": records, "SECONDS_TO_RUN": "0.3"},
                    "max_attempts": 10, "retry_delay": 0}
            url = a_url if i % 2 else b_url
            while time.monotonic() < deadline:
                try:
                    status, _, job = call(url, "POST", "/v1/jobs", token, body, f"job-{i}")
                except (urllib.error.URLError, ConnectionError, OSError):
                    # The killed one: the client goes to the other.
                    url = b_url
                    time.sleep(0.02)
                    continue
                assert status in (200, 201), job
                with lock:
                    acknowledged[i] = job["id"]
                time.sleep(0.1)
                break

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        for kill in range(3):
            # Killed while it runs jobs of its own (B runs its own meanwhile).
            while time.monotonic() < deadline:
                code, _, running = call(a_url, "GET", "/v1/jobs?state=running", token)
                mine = [j["id"] for j in running["jobs"] if j["worker"] == a_holder]
                if len(mine) >= 2:
                    break
                time.sleep(0.05)
            a.kill(signal.SIGKILL)
            assert mine, "A ran no job when it was killed"
            killed.update(mine)
            while time.monotonic() < deadline:
                states = [call(b_url, "GET", f"/v1/jobs/{i}", token)[2]["state"]
                          for i in mine]
                if all(s != "running" for s in states):
                    break
                time.sleep(0.2)
            a.start()
        for t in threads:
            t.join(timeout=max(1, deadline - time.monotonic()))
        assert len(acknowledged) == jobs
        ids = set(acknowledged.values())
        while True:
            states = all_jobs(b_url, token)
            assert set(states) == ids | {first["id"]}
            unfinished = [j for j in states.values() if j["state"] != "succeeded"]
            if not unfinished:
                break
            assert time.monotonic() < deadline, unfinished[:3]
            time.sleep(0.3)
        # Every attempt A was running when killed was recovered by B after
        # its lease expired (A restarted only after), none by A's start.
        expired = {j["id"]: [a_ for a_ in j["attempts"] if (a_["error"] or "").startswith(
            "lost: its lease expired")] for j in states.values()}
        for job_id in killed:
            assert [a_["holder"] for a_ in expired[job_id]] == [a_holder], states[job_id]
        assert not any(a_["error"].startswith("lost: the dispatcher stopped")
                       for j in states.values() for a_ in j["attempts"] if a_["error"])
        check_no_overlap(records, ids)
    finally:
        a.stop()
        b.stop()


def alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    return True


def test_a_dispatcher_cut_from_the_database_fences_and_recovers(tmp_path, database):
    """A dispatcher whose database is cut for 30 s answers 503
    store_unavailable (JSON, Retry-After) to requests that need the store,
    has killed its jobs by half a lease after the cut, while the other
    dispatcher recovers them once their leases expire and runs them to
    success; once the cut ends the first serves again, without a restart,
    and no job ran twice at once."""
    records = str(tmp_path / "records")
    os.mkdir(records)
    token_file, token = shared_token(tmp_path)
    proxy = Proxy(target(database))
    a = dispatcher(str(tmp_path), "a", through(database, proxy.port), free_port(),
                   token_file=token_file)
    b = dispatcher(str(tmp_path), "b", database, free_port(), token_file=token_file)
    body = {"command": ["sh", "-c", SCRIPT],
            "env": {"RECORDS": records, "SECONDS_TO_RUN": "6"},
            "max_attempts": 3, "retry_delay": 0}
    try:
        a.start()
        b.start()
        on_a = [call(a.url, "POST", "/v1/jobs", token, body)[2]["id"] for _ in range(4)]
        on_b = [call(b.url, "POST", "/v1/jobs", token, body)[2]["id"] for _ in range(4)]
        for job_id in on_a:
            a.wait(job_id, ("running",), token=token)
        time.sleep(0.5)
        pids = [pid for job_id in on_a for pid, _, _ in attempts_of(records, job_id)]
        assert len(pids) == 4 and all(alive(pid) for pid in pids)

        proxy.set_cut(True)
        cut_at = time.monotonic()
        # It says so at once, as JSON with Retry-After, from its first
        # failed renewal on; the routes that need no store still answer.
        while True:
            code, headers, answer = call(a.url, "GET", f"/v1/jobs/{on_a[0]}", token)
            if code == 503:
                break
            assert time.monotonic() - cut_at < LEASE_SECONDS, (code, answer)
            time.sleep(0.1)
        assert answer["error"]["code"] == "store_unavailable"
        assert "database" in answer["error"]["message"]
        assert headers["Retry-After"] == "5"
        code, _, answer = call(a.url, "POST", "/v1/jobs", token, body)
        assert (code, answer["error"]["code"]) == (503, "store_unavailable")
        assert call(a.url, "GET", "/healthz", token)[0] == 503
        assert call(a.url, "GET", "/v1/me", token)[0] == 200

        # Fenced by half a lease after its last renewal: its jobs are dead
        # before another dispatcher may take them.
        time.sleep(max(0.0, cut_at + LEASE_SECONDS / 2 + 1 - time.monotonic()))
        assert [pid for pid in pids if alive(pid)] == []

        # B recovers them after their leases expire, and runs every job.
        for job_id in on_a + on_b:
            done = b.wait(job_id, ("succeeded", "failed"), timeout=25, token=token)
            assert done["state"] == "succeeded", done
        recovered = [call(b.url, "GET", f"/v1/jobs/{i}", token)[2] for i in on_a]
        for job in recovered:
            assert job["attempts"][0]["error"].startswith("lost: its lease expired"), job
            assert job["attempts"][-1]["holder"] != job["attempts"][0]["holder"]
        assert time.monotonic() - cut_at < 30
        time.sleep(max(0.0, cut_at + 30 - time.monotonic()))
        assert call(a.url, "GET", "/healthz", token)[0] == 503

        proxy.set_cut(False)
        restored = time.monotonic()
        while call(a.url, "GET", "/healthz", token)[0] != 200:
            assert time.monotonic() - restored < 15
            time.sleep(0.2)
        code, _, job = call(a.url, "POST", "/v1/jobs", token,
                            dict(body, env={"RECORDS": records, "SECONDS_TO_RUN": "0"}))
        assert code == 201, job
        # Reads go through the readers' pool (psycopg_pool), whose attempts
        # to reconnect back off exponentially while the database is away:
        # a read may answer 503 for some seconds after /healthz (the
        # writer) says 200 (seen once in CI).
        done = a.wait(job["id"], ("succeeded", "failed"), timeout=30, token=token)
        assert done["state"] == "succeeded", done
        check_no_overlap(records, on_a + on_b + [job["id"]])
    finally:
        a.stop()
        b.stop()
        proxy.close()


def test_a_new_name_still_recovers_the_last_runs_jobs(tmp_path):
    """On SQLite, a dispatcher killed while a job ran and restarted under a
    [dispatcher] name it did not have records the attempt of its old holder
    (local@HOST, kept in data_dir/holder) lost, and runs the job again as
    local@NAME."""
    records = str(tmp_path / "records")
    os.mkdir(records)
    port = free_port()
    daemon = Twistd(str(tmp_path), "[executor]\nslots = 1\n",
                    listen=f"tcp:{port}:interface=127.0.0.1")
    try:
        daemon.start()
        code, job = daemon.request("POST", "/v1/jobs", {
            "command": ["sh", "-c", SCRIPT], "max_attempts": 2, "retry_delay": 0,
            "env": {"RECORDS": records, "SECONDS_TO_RUN": "30"}})
        assert code == 201, job
        daemon.wait(job["id"], ("running",))
        daemon.kill(signal.SIGKILL)
        with open(daemon.config, "a") as f:
            f.write("[dispatcher]\nname = renamed\n")
        daemon.start()
        code, again = daemon.request("GET", f"/v1/jobs/{job['id']}")
        first, second = again["attempts"]
        assert first["holder"] == f"local@{socket.gethostname()}"
        assert first["error"].startswith("lost: the dispatcher stopped")
        assert second["holder"] == "local@renamed"
        assert open(os.path.join(str(tmp_path), "data", "holder")).read() == "local@renamed\n"
    finally:
        daemon.stop()
