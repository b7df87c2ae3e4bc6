"""
Two real dispatchers (`twistd -n dispatcher`) on one real PostgreSQL
database hear each other: a job submitted to one that has no slots is run
by the other at once (a notification, not its poll); an event stream on
one sees the other's events in id order, none skipped or repeated; a wait
on one ends when the other's job ends; the polls alone still run jobs
(notifications off, or the listening connections killed); a queue's
max_running holds across both; each counts the other's jobs by queue.
"""

import os
import time

import psycopg
import pytest

from tests.postgres import Databases
from tests.test_events import EventReader
from tests.test_twistd import Twistd

FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def database():
    """The URL of a database of the test's own, dropped at teardown."""
    made = Databases()
    yield made.url("db")
    made.drop()


class Dispatcher(Twistd):
    """A dispatcher of a pair: its own data directory (its own credentials
    and admin token) and holder name."""

    def __init__(self, workdir, ini, name):
        os.makedirs(os.path.join(workdir, "data"), 0o700)
        # Its local jobs' holder is local@NAME.
        super().__init__(workdir, f"[dispatcher]\nname = {name}\n{ini}")


@pytest.fixture
def pair(tmp_path, database):
    """Start two dispatchers on one database, each with its own ini text
    after the [store] section's url; both killed at teardown."""
    made = []

    def start(ini_a, ini_b, store=""):
        a = Dispatcher(str(tmp_path / "a"), f"[store]\nurl = {database}\n{store}{ini_a}", "a")
        made.append(a)
        a.start()
        b = Dispatcher(str(tmp_path / "b"), f"[store]\nurl = {database}\n{store}{ini_b}", "b")
        made.append(b)
        b.start()
        return a, b

    yield start
    for daemon in made:
        daemon.stop()


def submit(daemon, command, **fields):
    code, job = daemon.request("POST", "/v1/jobs", {"command": command, **fields})
    assert code == 201, job
    return job


def test_a_job_submitted_to_a_dispatcher_without_slots_runs_on_another_at_once(pair):
    """A job submitted to a dispatcher with no slots is run by the other
    one, as soon as it is committed: its polls are 30 s apart, so the
    notification woke it."""
    a, b = pair("[executor]\nslots = 0\n", "[executor]\nslots = 2\n",
                store="poll_interval = 30\n")
    started = time.monotonic()
    job = submit(a, ["sh", "-c", "echo ran"])
    done = a.wait(job["id"], FINAL, timeout=20)
    assert done["state"] == "succeeded", done
    assert [attempt["holder"] for attempt in done["attempts"]] == ["local@b"]
    assert time.monotonic() - started < 10


def test_an_event_stream_sees_the_other_dispatchers_events_in_order(pair):
    """A live event stream on either dispatcher sees every event both
    committed (the submissions on one, the runs on the other), in id order
    with no gap and none twice, the same on both."""
    a, b = pair("[executor]\nslots = 0\n", "[executor]\nslots = 2\n",
                store="poll_interval = 30\n")
    on_a = EventReader(a.url, a.token)
    on_b = EventReader(b.url, b.token)
    try:
        assert on_a.status == on_b.status == 200
        jobs = [submit(a, ["true"]) for _ in range(4)]
        code, batch = a.request("POST", "/v1/jobs/batch", {"jobs": [{"command": ["true"]}] * 3})
        assert code == 201, batch
        ids = {job["id"] for job in jobs} | {job["id"] for job in batch["jobs"]}
        seen = {}
        for reader in (on_a, on_b):
            ended = set()

            def done(event):
                kind, _, data = event
                if kind == "job" and data["state"] in FINAL and data["job_id"] in ids:
                    ended.add(data["job_id"])
                return ended == ids

            seen[reader] = reader.until(done)
        for events in seen.values():
            numbers = [event_id for _, event_id, _ in events]
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
            for job_id in ids:
                states = [data["state"] for kind, _, data in events
                          if kind == "job" and data["job_id"] == job_id]
                assert states == ["queued", "running", "succeeded"], states
        # One sequence, whoever committed what.
        assert seen[on_a] == seen[on_b][:len(seen[on_a])] or \
            seen[on_b] == seen[on_a][:len(seen[on_b])]
    finally:
        on_a.close()
        on_b.close()


def test_a_wait_on_one_dispatcher_ends_when_the_others_job_ends(pair):
    """GET /v1/jobs/ID?wait= on one dispatcher for a job the other runs
    answers as soon as the job ends there, not when the wait runs out."""
    a, b = pair("[executor]\nslots = 1\n", "[executor]\nslots = 0\n",
                store="poll_interval = 30\n")
    job = submit(a, ["sleep", "1"])
    started = time.monotonic()
    code, waited = b.request("GET", f"/v1/jobs/{job['id']}?wait=9")
    assert code == 200, waited
    assert waited["state"] == "succeeded"
    assert time.monotonic() - started < 6


def listener_backends(url):
    with psycopg.connect(url, autocommit=True) as conn:
        return [pid for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'dispatcher store listener'"
        )]


@pytest.mark.parametrize("how", ["notify off", "listeners killed"])
def test_the_polls_alone_run_the_others_jobs(pair, database, how):
    """Without notifications (none sent, or the listening connections
    killed by the server), a job submitted to a dispatcher with no slots is
    still run by the other, at its next poll."""
    store = "poll_interval = 0.5\n" + ("notify = no\n" if how == "notify off" else "")
    a, b = pair("[executor]\nslots = 0\n", "[executor]\nslots = 1\n", store=store)
    if how == "notify off":
        assert listener_backends(database) == []
    else:
        deadline = time.monotonic() + 10
        while len(listener_backends(database)) < 2:
            assert time.monotonic() < deadline, "the dispatchers never listened"
            time.sleep(0.05)
        with psycopg.connect(database, autocommit=True) as conn:
            for pid in listener_backends(database):
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    jobs = [submit(a, ["true"]) for _ in range(3)]
    for job in jobs:
        done = a.wait(job["id"], FINAL, timeout=20)
        assert done["state"] == "succeeded", done
        assert done["attempts"][-1]["holder"] == "local@b"
    if how == "listeners killed":
        # And both listen again.
        deadline = time.monotonic() + 10
        while len(listener_backends(database)) < 2:
            assert time.monotonic() < deadline, "the dispatchers did not listen again"
            time.sleep(0.05)


def test_a_queues_max_running_holds_across_dispatchers(pair):
    """A queue limited to one running job runs one at a time in all, though
    both dispatchers have free slots and jobs are submitted to both."""
    queue = "[queue:one]\nmax_running = 1\n"
    a, b = pair(f"[executor]\nslots = 3\n{queue}", f"[executor]\nslots = 3\n{queue}",
                store="poll_interval = 30\n")
    jobs = []
    for _ in range(4):
        jobs.append(submit(a, ["sleep", "0.2"], queue="one"))
        jobs.append(submit(b, ["sleep", "0.2"], queue="one"))
    spans = []
    for job in jobs:
        done = a.wait(job["id"], FINAL, timeout=30)
        assert done["state"] == "succeeded", done
        (attempt,) = done["attempts"]
        spans.append((attempt["started_at"], attempt["finished_at"]))
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, spans


def test_a_dispatcher_held_by_a_queues_limit_starts_as_the_others_job_ends(pair):
    """A dispatcher whose queue is full because of the other's running job
    starts its own as soon as that job ends there (the other, stopping,
    takes no more; the polls are 30 s apart)."""
    queue = "[queue:one]\nmax_running = 1\n"
    a, b = pair(f"[executor]\nslots = 1\n{queue}", f"[executor]\nslots = 1\n{queue}",
                store="poll_interval = 30\n")
    first = submit(a, ["sleep", "2"], queue="one")
    running = a.wait(first["id"], ("running",))
    assert running["attempts"][-1]["holder"] == "local@a"
    second = submit(b, ["true"], queue="one")
    time.sleep(0.3)
    code, held = b.request("GET", f"/v1/jobs/{second['id']}")
    assert held["state"] == "queued", held
    # A stops: it waits for its job, then claims nothing more.
    a.stop_gracefully()
    done = b.wait(first["id"], FINAL)
    assert done["state"] == "succeeded"
    ended = time.monotonic()
    after = b.wait(second["id"], FINAL, timeout=20)
    assert after["state"] == "succeeded", after
    assert after["attempts"][-1]["holder"] == "local@b"
    assert time.monotonic() - ended < 5
    assert done["attempts"][-1]["finished_at"] <= after["attempts"][-1]["started_at"]


@pytest.mark.parametrize("store", ["poll_interval = 30\n", "poll_interval = 0.5\nnotify = no\n"])
def test_a_cancel_on_one_dispatcher_stops_the_job_the_other_runs(pair, tmp_path, store):
    """A job running on one dispatcher, cancelled through the other, is
    stopped by the one that runs it, at once (the polls are 30 s apart) or
    at its next poll (no notifications); and the place it held under its
    queue's limit goes to the job waiting."""
    queue = "[queue:one]\nmax_running = 1\n"
    a, b = pair(f"[executor]\nslots = 1\n{queue}", f"[executor]\nslots = 1\n{queue}",
                store=store)
    marker = tmp_path / "ran-to-the-end"
    first = submit(a, ["sh", "-c", f"sleep 10; touch {marker}"], queue="one")
    a.wait(first["id"], ("running",))
    second = submit(b, ["true"], queue="one")
    time.sleep(0.3)
    code, _ = b.request("POST", f"/v1/jobs/{first['id']}/cancel")
    assert code == 202
    cancelled = time.monotonic()
    done = b.wait(first["id"], FINAL, timeout=10)
    assert done["state"] == "cancelled", done
    after = b.wait(second["id"], FINAL, timeout=10)
    assert after["state"] == "succeeded", after
    assert time.monotonic() - cancelled < 5
    assert done["attempts"][-1]["finished_at"] <= after["attempts"][-1]["started_at"]
    assert not marker.exists()


def test_each_dispatcher_counts_the_others_jobs_by_queue(pair):
    """GET /v1/queues on one dispatcher counts the jobs the other queued
    and cancelled (within its re-read of the counts)."""
    a, b = pair("[executor]\nslots = 0\n", "[executor]\nslots = 0\n")
    jobs = [submit(a, ["true"]) for _ in range(3)]

    def counts(daemon):
        code, queues = daemon.request("GET", "/v1/queues")
        assert code == 200, queues
        return queues["queues"]["default"]["counts"]

    def settles(daemon, expected):
        deadline = time.monotonic() + 5
        while True:
            found = counts(daemon)
            if all(found[state] == n for state, n in expected.items()):
                return
            assert time.monotonic() < deadline, found
            time.sleep(0.05)

    settles(b, {"queued": 3})
    code, _ = b.request("POST", f"/v1/jobs/{jobs[0]['id']}/cancel")
    assert code in (200, 202)
    settles(a, {"queued": 2, "cancelled": 1})
    settles(b, {"queued": 2, "cancelled": 1})
