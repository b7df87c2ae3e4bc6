"""
The real daemon under load from several clients while it is killed with
SIGKILL and restarted three times: every acknowledged job is kept and
succeeds, none is lost, none ever runs twice at once; on each store (the
SQLite file, and PostgreSQL in a database of the test's own).
"""

import json
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest

from .conftest import free_port
from .postgres import Databases
from .test_twistd import Twistd

JOBS = 2000
CLIENTS = 8
KILLS = 3

# Each job holds an exclusive lock named after itself while it runs; a second
# copy running at the same time fails to take it and says so.
SCRIPT = (
    'exec 9>"$LOCKS/$DISPATCHER_JOB_ID"; '
    'flock -n 9 || echo "$DISPATCHER_JOB_ID" >> "$LOCKS/overlaps"; '
    "sleep 0.01"
)



def post(url, body, key, token):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Idempotency-Key": key,
                 "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        # An answer, not a lost connection: the test fails on it.
        return e.code, json.loads(e.read() or b"null")


def get(url, token):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(params=["sqlite", "postgresql"])
def store_ini(request):
    """The [store] section of the store under test (none: SQLite's file)."""
    if request.param == "sqlite":
        yield ""
        return
    databases = Databases()
    yield f"[store]\nurl = {databases.url('db')}\n"
    databases.drop()


def test_acknowledged_jobs_survive_kill_and_restart(tmp_path, store_ini):
    """2,000 jobs from 8 clients, 3 SIGKILLs with restarts: all acknowledged
    jobs present and succeeded, none lost, none ran twice at once."""
    locks = tmp_path / "locks"
    locks.mkdir()
    port = free_port()
    daemon = Twistd(str(tmp_path), "[executor]\nslots = 8\nkill_grace = 1\n" + store_ini,
                    listen=f"tcp:{port}:interface=127.0.0.1")
    daemon.start()
    token = daemon.token
    url = f"http://127.0.0.1:{port}"
    acknowledged = {}
    lock = threading.Lock()
    deadline = time.monotonic() + 240

    def client(number):
        for i in range(number, JOBS, CLIENTS):
            body = {"command": ["sh", "-c", SCRIPT], "env": {"LOCKS": str(locks)},
                    "max_attempts": KILLS + 2, "retry_delay": 0,
                    "labels": {"n": str(i)}}
            while time.monotonic() < deadline:
                try:
                    # The key makes a retried submission safe: an answer lost
                    # in a crash never makes a second job.
                    status, job = post(url + "/v1/jobs", body, f"job-{i}", token)
                except (urllib.error.URLError, ConnectionError, OSError):
                    time.sleep(0.02)
                    continue
                assert status in (200, 201), job
                with lock:
                    acknowledged[i] = job["id"]
                break

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        for kill in range(KILLS):
            target = (kill + 1) * JOBS // (KILLS + 1)
            while len(acknowledged) < target and time.monotonic() < deadline:
                time.sleep(0.01)
            daemon.kill(signal.SIGKILL)
            daemon.start()
        for t in threads:
            t.join(timeout=max(1, deadline - time.monotonic()))
        assert len(acknowledged) == JOBS

        ids = set(acknowledged.values())
        assert len(ids) == JOBS  # one job per key, retries included
        while True:
            seen, states, cursor = set(), {}, ""
            while True:
                page = get(f"{url}/v1/jobs?limit=1000{cursor}", token)
                for job in page["jobs"]:
                    seen.add(job["id"])
                    states[job["id"]] = job
                if not page["next_cursor"]:
                    break
                cursor = f"&cursor={page['next_cursor']}"
            assert seen == ids  # none lost, none extra
            unfinished = [j for j in states.values()
                          if j["state"] not in ("succeeded", "failed", "cancelled")]
            if not unfinished:
                break
            assert time.monotonic() < deadline, unfinished[:3]
            time.sleep(0.2)
        failed = [j for j in states.values() if j["state"] != "succeeded"]
        assert failed == []
        lost = sum(1 for j in states.values() for a in j["attempts"]
                   if a["error"] and a["error"].startswith("lost"))
        assert lost > 0  # the kills did hit running jobs
        overlaps = locks / "overlaps"
        assert not overlaps.exists(), overlaps.read_text()
    finally:
        daemon.stop()
