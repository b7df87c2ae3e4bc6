"""
GET /metrics: the Prometheus text format written by prometheus_client,
read back by its own parser from a real twistd; who may read it; the
values after jobs ran, after a kill -9 and a restart; and, with a Clock,
the reactor watch and the observations that feed the histograms.
"""

import functools
import http.server
import os
import signal
import sqlite3
import threading
import time
import urllib.error
import urllib.request

import re

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from dispatcher.api._metrics import (
    RUN_BUCKETS,
    Counter,
    DispatcherMetrics,
    Histogram,
    ReactorWatch,
)
from dispatcher.model._events import JobEvent
from dispatcher.model._jobs import JobSpec, JobState
from tests.test_twistd import twistd  # noqa: F401 (the fixture)


def scrape(daemon, token=None):
    """The status, content type and text of GET /metrics."""
    token = daemon.token if token is None else token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(daemon.url + "/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def samples(text):
    """C{{(sample name, sorted labels): value}} of every sample of C{text},
    as prometheus_client's parser reads it."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found, name, **labels):
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def jobs_in(found, state, queue="default"):
    return value(found, "dispatcher_jobs", queue=queue, state=state)


def fresh_group_by(data_dir):
    """The jobs by queue and state, counted now from the store's rows."""
    conn = sqlite3.connect(os.path.join(data_dir, "dispatcher.sqlite3"))
    try:
        return {
            (q, s): n
            for q, s, n in conn.execute("SELECT queue, state, COUNT(*) FROM jobs GROUP BY 1, 2")
        }
    finally:
        conn.close()


def until_scraped(daemon, condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        status, _, text = scrape(daemon)
        assert status == 200, text
        found = samples(text)
        if condition(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_a_real_daemon_s_metrics_follow_its_jobs(twistd, tmp_path):  # noqa: F811
    """A twistd's /metrics parses with prometheus_client's own parser; after
    jobs run, the counts by state, the submissions and ends, the waits' and
    run times' histograms and the commits' say so; no label names a job or
    an owner; the counts are what a GROUP BY says, and stay so after a
    kill -9 and a restart, as GET /v1/queues does."""
    daemon = twistd("[executor]\nslots = 2\n[queue:batch]\nmax_running = 1\n")
    daemon.start()
    status, content_type, text = scrape(daemon)
    assert status == 200
    assert content_type.startswith("text/plain")
    before = samples(text)
    for state in JobState:
        assert jobs_in(before, state.value) == 0
        assert jobs_in(before, state.value, "batch") == 0
    assert value(before, "dispatcher_jobs_submitted_total", queue="default") == 0
    assert value(before, "dispatcher_http_connections") >= 1
    assert ("dispatcher_reactor_longest_hold_seconds", ()) in before

    ids = []
    for command in (["true"], ["true"], ["false"]):
        code, job = daemon.request("POST", "/v1/jobs", {"command": command})
        assert code == 201
        ids.append(job["id"])
    code, batch = daemon.request("POST", "/v1/jobs/batch", {
        "jobs": [{"command": ["true"], "queue": "batch"} for _ in range(4)]})
    assert code == 201, batch
    ids += [j["id"] for j in batch["jobs"]]
    for job_id in ids:
        daemon.wait(job_id, ("succeeded", "failed"))

    found = until_scraped(
        daemon, lambda f: value(f, "dispatcher_jobs_ended_total", queue="batch",
                                outcome="succeeded") == 4)
    assert jobs_in(found, "succeeded") == 2
    assert jobs_in(found, "failed") == 1
    assert jobs_in(found, "succeeded", "batch") == 4
    # Bounded labels: the queues configured, states, outcomes and buckets,
    # never a job, an owner or a worker.
    states = {state.value for state in JobState}
    allowed = {"queue": {"default", "batch"}, "state": states, "outcome": states}
    for (name, labels), _ in found.items():
        for label, label_value in labels:
            assert label == "le" or label_value in allowed[label], (name, label, label_value)
    text = scrape(daemon)[2]
    assert not [job_id for job_id in ids if job_id in text]
    assert "admin" not in text
    assert jobs_in(found, "queued") == jobs_in(found, "running") == 0
    assert value(found, "dispatcher_jobs_submitted_total", queue="default") == 3
    assert value(found, "dispatcher_jobs_submitted_total", queue="batch") == 4
    assert value(found, "dispatcher_jobs_ended_total", queue="default",
                 outcome="succeeded") == 2
    assert value(found, "dispatcher_jobs_ended_total", queue="default", outcome="failed") == 1
    assert value(found, "dispatcher_job_wait_seconds_count", queue="default") == 3
    assert value(found, "dispatcher_job_wait_seconds_count", queue="batch") == 4
    assert value(found, "dispatcher_job_run_seconds_count", queue="default") == 3
    assert value(found, "dispatcher_job_run_seconds_count", queue="batch") == 4
    assert value(found, "dispatcher_job_run_seconds_sum", queue="batch") > 0
    commits = value(found, "dispatcher_store_commit_seconds_count")
    assert commits >= 4
    assert value(found, "dispatcher_store_commit_writes_count") == commits
    assert value(found, "dispatcher_store_commit_writes_sum") >= 3 * 7
    # Every scrape reads the counts the writer keeps: what a scan says.
    data_dir = os.path.join(str(tmp_path), "data")
    assert {
        (q, s): n for (name, labels), n in found.items() if name == "dispatcher_jobs" and n
        for q, s in [(dict(labels)["queue"], dict(labels)["state"])]
    } == fresh_group_by(data_dir)

    # Jobs left queued and running, then a kill -9.
    code, sleeper = daemon.request("POST", "/v1/jobs", {"command": ["sleep", "300"],
                                                        "queue": "batch"})
    daemon.wait(sleeper["id"], ("running",))
    for _ in range(3):
        assert daemon.request("POST", "/v1/jobs", {"command": ["true"],
                                                   "queue": "batch"})[0] == 201
    assert daemon.kill(signal.SIGKILL) == -signal.SIGKILL
    daemon.start()
    lost = daemon.wait(sleeper["id"], ("failed",))
    assert "lost" in lost["error"]
    for _ in range(200):
        code, answer = daemon.request("GET", "/v1/queues")
        queues = answer["queues"]
        if queues["batch"]["counts"]["succeeded"] == 7:
            break
        time.sleep(0.05)
    found = until_scraped(daemon, lambda f: jobs_in(f, "succeeded", "batch") == 7)
    expected = fresh_group_by(data_dir)
    assert expected[("batch", "failed")] == 1
    for queue in ("default", "batch"):
        for state in JobState:
            n = expected.get((queue, state.value), 0)
            assert jobs_in(found, state.value, queue) == n
            assert queues[queue]["counts"][state.value] == n
    # The events' counters begin again with the process; the counts do not.
    assert value(found, "dispatcher_jobs_submitted_total", queue="default") == 0


def test_who_may_read_the_metrics(twistd):  # noqa: F811
    """A scrape without a credential is 401 as any route's; a submitter's is
    403; a metrics credential reads the metrics and no job; readers and
    admins read them too."""
    daemon = twistd("[executor]\nslots = 0\n")
    daemon.start()
    status, _, text = scrape(daemon, token="")
    assert status == 401, text
    assert '"unauthorized"' in text
    tokens = {}
    for name, role in (("scraper", "metrics"), ("sue", "submitter"), ("rita", "reader")):
        code, made = daemon.request("POST", "/v1/credentials", {"name": name, "role": role})
        assert code == 201, made
        tokens[role] = made["token"]
    status, _, text = scrape(daemon, tokens["submitter"])
    assert status == 403
    assert "metrics" in text
    for role in ("metrics", "reader"):
        status, _, text = scrape(daemon, tokens[role])
        assert status == 200
        assert "dispatcher_jobs" in samples_names(text)
    code, answer = daemon.request("GET", "/v1/jobs", token=tokens["metrics"])
    assert code == 403
    code, answer = daemon.request("GET", "/v1/queues", token=tokens["metrics"])
    assert code == 403
    code, me = daemon.request("GET", "/v1/me", token=tokens["metrics"])
    assert (code, me["role"]) == (200, "metrics")


def test_a_real_daemon_s_subscribers_and_staging(twistd, tmp_path):  # noqa: F811
    """A twistd's /metrics counts the clients following GET /v1/events while
    they follow, and the inputs its executor staged: the bytes and inputs
    of one fetched, and one it could not fetch (its job failed)."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "in.txt").write_bytes(b"twelve bytes")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(files))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    files_url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        daemon = twistd("[executor]\nslots = 2\n[fetch]\nallow = 127.0.0.0/8\n")
        daemon.start()
        found = samples(scrape(daemon)[2])
        for name in ("dispatcher_event_subscribers", "dispatcher_staging_bytes_total",
                     "dispatcher_staging_inputs_total", "dispatcher_staging_failures_total",
                     "dispatcher_workers_connected", "dispatcher_leases_expired_total"):
            assert (name, ()) in found and value(found, name) == 0, name
        request = urllib.request.Request(daemon.url + "/v1/events", headers={
            "Authorization": f"Bearer {daemon.token}", "Accept": "text/event-stream"})
        with urllib.request.urlopen(request, timeout=10) as stream:
            assert stream.status == 200
            until_scraped(daemon, lambda f: value(f, "dispatcher_event_subscribers") == 1)
            found = samples(scrape(daemon)[2])
            assert value(found, "dispatcher_event_subscribers") == 1
        found = until_scraped(daemon, lambda f: value(f, "dispatcher_event_subscribers") == 0)
        assert value(found, "dispatcher_event_subscribers") == 0
        code, fetched = daemon.request("POST", "/v1/jobs", {
            "command": ["cat", "in.txt"], "max_attempts": 1,
            "inputs": [{"url": files_url + "/in.txt", "path": "in.txt"}]})
        assert code == 201, fetched
        code, missing = daemon.request("POST", "/v1/jobs", {
            "command": ["true"], "max_attempts": 1,
            "inputs": [{"url": files_url + "/missing.txt", "path": "missing.txt"}]})
        assert code == 201, missing
        assert daemon.wait(fetched["id"], ("succeeded", "failed"))["state"] == "succeeded"
        assert daemon.wait(missing["id"], ("succeeded", "failed"))["state"] == "failed"
        found = samples(scrape(daemon)[2])
        assert value(found, "dispatcher_staging_bytes_total") == len(b"twelve bytes")
        assert value(found, "dispatcher_staging_inputs_total") == 1
        assert value(found, "dispatcher_staging_failures_total") == 1
    finally:
        server.shutdown()
        server.server_close()


def samples_names(text):
    return {family.name for family in text_string_to_metric_families(text)}


def test_reactor_watch_keeps_the_longest_hold_of_two_windows():
    """The watch's timer notes how late it fires; the longest lateness of
    the window under way and the one before is shown, and older ones go."""
    clock = Clock()
    watch = ReactorWatch(clock, interval=0.1, window=10.0)
    watch.startService()
    clock.advance(0.1)
    assert watch.longest == 0.0
    # The reactor held for 2.1 s: the timer due at 0.2 fires at 2.3.
    clock.advance(2.1)
    assert watch.longest == pytest.approx(2.0)
    for _ in range(100):
        clock.advance(0.1)
    assert watch.longest == pytest.approx(2.0)
    for _ in range(200):
        clock.advance(0.1)
    assert watch.longest == pytest.approx(0.0, abs=1e-6)
    watch.stopService()
    assert clock.getDelayedCalls() == []


def test_histogram_writes_what_prometheus_clients_writes():
    """The metrics' own histogram, labelled or not, with the same
    observations (on bounds, between them, past the last, zero, negative,
    NaN and infinite), writes the very text of prometheus_client's
    Histogram, but for the _created times, which are each one's own."""
    texts = []
    for kind in (prometheus_client.Histogram, Histogram):
        registry = CollectorRegistry(auto_describe=False)
        by_queue = kind("wait_seconds", "Waits, by queue.", ["queue"], buckets=RUN_BUCKETS,
                        registry=registry)
        plain = kind("writes", "Writes.", buckets=(1, 2, 5, 10), registry=registry)
        kind("unused", "Never observed.", ["queue"], buckets=(1,), registry=registry)
        for amount in (0.0, 0.001, 0.0011, 0.3, 5.0, 86400.0, 1e9, -1.0, float("nan"),
                       float("inf"), 3.25):
            by_queue.labels("gpu").observe(amount)
            plain.observe(amount)
        by_queue.labels("default").observe(2.0)
        plain.observe(7)
        texts.append(generate_latest(registry).decode())
    stock, ours = (re.sub(r"(?m)^(\w+_created(\{[^}]*\})?) \S+$", r"\1 T", t)
                     for t in texts)
    assert ours == stock
    assert 'wait_seconds_bucket{le="0.001",queue="gpu"} 3.0' in ours
    assert "writes_count 11.0" in ours and "# TYPE unused histogram" in ours
    assert ours.count(" T\n") == 3


def test_counter_writes_what_prometheus_clients_writes():
    """The metrics' own counter, labelled or not, with the same additions
    (one, several, a fraction, zero), writes the very text of
    prometheus_client's Counter, but for the _created times, which are each
    one's own; and refuses a negative amount, as that one does."""
    texts = []
    for kind in (prometheus_client.Counter, Counter):
        registry = CollectorRegistry(auto_describe=False)
        by_outcome = kind("jobs_ended", "Jobs ended, by queue and outcome.",
                          ["queue", "outcome"], registry=registry)
        plain = kind("commits", "Commits.", registry=registry)
        kind("unused", "Never counted.", ["queue"], registry=registry)
        for amount in (1, 1, 3, 0.5, 0):
            by_outcome.labels("gpu", "failed").inc(amount)
            plain.inc(amount)
        by_outcome.labels("default", "succeeded").inc()
        plain.inc()
        with pytest.raises(ValueError):
            by_outcome.labels("gpu", "failed").inc(-1)
        texts.append(generate_latest(registry).decode())
    stock, ours = (re.sub(r"(?m)^(\w+_created(\{[^}]*\})?) \S+$", r"\1 T", t)
                     for t in texts)
    assert ours == stock
    assert 'jobs_ended_total{outcome="failed",queue="gpu"} 5.5' in ours
    assert "commits_total 6.5" in ours and "# TYPE unused_total counter" in ours
    assert ours.count(" T\n") == 3


class _Store:
    def __init__(self):
        self.counts = {}

    def job_counts(self, owner=None):
        return self.counts


def test_observed_events_count_submissions_ends_and_run_times():
    """A new job counts as submitted, a final state as an end by outcome, and
    the time from running to the end is a run time, each by queue; a job
    whose start was never seen is not timed, and nothing is kept of it."""
    metrics = DispatcherMetrics(_Store(), ["default", "gpu"], Clock())
    gpu = JobSpec(queue="gpu")
    metrics.observe_events([
        JobEvent("a", JobState.QUEUED, at=10.0, spec=gpu),
        JobEvent("b", JobState.QUEUED, at=10.0, spec=gpu),
        JobEvent("d", JobState.PENDING, at=10.0, spec=JobSpec()),
        JobEvent("e", JobState.QUEUED, at=10.0, spec=gpu),
    ])
    metrics.observe_events([
        JobEvent("a", JobState.RUNNING, at=11.0, previous=JobState.QUEUED, spec=gpu)])
    metrics.observe_events([
        JobEvent("a", JobState.SUCCEEDED, at=14.5, previous=JobState.RUNNING, spec=gpu),
        JobEvent("c", JobState.FAILED, at=15.0, previous=JobState.RUNNING, spec=gpu),
    ])
    metrics.observe_claimed([("gpu", 1.0), ("default", 0.25)])
    metrics.observe_commit(0.002, 7)
    found = samples(metrics.render().decode())
    assert value(found, "dispatcher_jobs_submitted_total", queue="gpu") == 3
    assert value(found, "dispatcher_jobs_submitted_total", queue="default") == 1
    assert value(found, "dispatcher_jobs_ended_total", queue="gpu", outcome="succeeded") == 1
    assert value(found, "dispatcher_jobs_ended_total", queue="gpu", outcome="failed") == 1
    assert value(found, "dispatcher_job_run_seconds_count", queue="gpu") == 1
    assert value(found, "dispatcher_job_run_seconds_sum", queue="gpu") == 3.5
    assert value(found, "dispatcher_job_wait_seconds_sum", queue="default") == 0.25
    assert value(found, "dispatcher_store_commit_writes_sum") == 7
    assert value(found, "dispatcher_store_commit_writes_bucket", le="5.0") == 0
    assert value(found, "dispatcher_store_commit_writes_bucket", le="10.0") == 1
    assert metrics._running == {}
    # Every configured queue shows every state, zeros included.
    assert jobs_in(found, "queued", "gpu") == 0
    assert ("dispatcher_jobs", (("queue", "gpu"), ("state", "pending"))) in found
