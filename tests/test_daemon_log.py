"""
The daemon's log: each job's start and end from the committed events (with
a Clock), and a real twistd's text and JSON logs (start-up lines, a job's
life with its keyword fields, no migration or factory noise, --version; a
real worker's arrival, its lease's expiry and its leaving).
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from twisted.internet.task import Clock
from twisted.logger import (
    Logger,
    LogLevel,
    LogPublisher,
    eventsFromJSONLogFile,
    formatEvent,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.failure import Failure

from dispatcher.app._logging import text_observer

from dispatcher.core._joblog import JobLog
from dispatcher.model._events import JobEvent, WorkerEvent
from dispatcher.model._jobs import JobState

from .conftest import as_the_tests_account, poll
from .test_metrics import samples, scrape, value
from .test_remote import dispatcher, get, start_worker, submit  # noqa: F401 (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


@pytest.fixture
def captured():
    """The events logged by dispatcher.core._joblog while a test runs."""
    events = []

    def observe(event):
        if event.get("log_namespace") == "dispatcher.core._joblog":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def _started(job_id, holder="local@h", attempt=1):
    return JobEvent(job_id, JobState.RUNNING, None, 1, 0.0, JobState.QUEUED, attempt,
                    None, None, "alice", None, holder)


def test_start_and_end_lines_carry_their_fields(captured):
    """A claim is told as a start on its holder, an end as its state with the
    exit code or the error, each with job_id, owner, attempt and holder as
    fields; a new job and a promotion are not told (the API's line tells a
    submission)."""
    job_log = JobLog(Clock(), None)
    job_log.write([
        JobEvent("j0", JobState.QUEUED, None, 1, 0.0, None, None, None, None, "alice"),
        JobEvent("j0", JobState.QUEUED, None, 2, 0.0, JobState.PENDING, None, None, None,
                 "alice"),
    ])
    assert captured == []
    job_log.write([_started("j1", "worker-a", 2)])
    job_log.write([
        JobEvent("j1", JobState.FAILED, None, 3, 0.0, JobState.RUNNING, 2, 3, None, "alice",
                 None, "worker-a"),
        JobEvent("j2", JobState.QUEUED, None, 4, 0.0, JobState.RUNNING, 1, None,
                 "the lease expired", "bob", None, "worker-b"),
        JobEvent("j3", JobState.CANCELLED, None, 5, 0.0, JobState.QUEUED, None, None,
                 "cancelled by alice", "alice"),
    ])
    job_log.write([WorkerEvent(6, 0.0, "worker-a", "left")])
    lines = [formatEvent(e) for e in captured]
    assert lines == [
        "job j1 attempt 2 started on worker-a",
        "job j1 attempt 2 failed on worker-a (exit code 3)",
        "job j2 attempt 1 on worker-b ended without a result (the lease expired); "
        "the job is queued again",
        "job j3 cancelled: cancelled by alice",
        "worker worker-a left",
    ]
    start = captured[0]
    assert (start["job_id"], start["owner"], start["attempt"], start["holder"],
            start["state"]) == ("j1", "alice", 2, "worker-a", "running")
    assert captured[1]["exit_code"] == 3 and captured[1]["log_level"] is LogLevel.info
    assert captured[3]["holder"] is None and captured[3]["error"] == "cancelled by alice"


class _Shown:
    """A value with an attribute, an item, a repr and a method, for formats."""

    size = 7

    def __getitem__(self, key):
        return f"item {key}"

    def __repr__(self):
        return "<shown>"

    def name(self):
        return "called"


def test_text_observer_writes_what_twisteds_text_observer_writes(monkeypatch):
    """The daemon's text observer writes, for every kind of event, the very
    lines twisted.logger's textFileLogObserver writes: plain fields, format
    specs, conversions, attributes and items, a call in the format, a field
    missing, a traceback, a system, no time, no namespace or level, a
    newline in the text, an empty or absent format, and times in the same
    and in following seconds, in another UTC offset too."""
    monkeypatch.setenv("TZ", "America/St_Johns")
    time.tzset()
    try:
        stock, ours = io.StringIO(), io.StringIO()
        publisher = LogPublisher(textFileLogObserver(stock), text_observer(ours))
        log = Logger(namespace="dispatcher.test", observer=publisher)
        shown = _Shown()
        log.info("{principal} submitted {what}{replay}", principal="alice", what="j1",
                 replay="")
        log.warn("{n:>5} {f:.2f} {r!r} {s!s} {a!a}", n=3, f=1.0 / 3, r="x", s=b"y", a="é")
        log.error("{v.size} {v[key]} {v.name()} {v}", v=shown)
        log.info("{missing} is not given", present=1)
        log.info("two\nlines {x}", x="and\nmore")
        log.info("")
        log.info("positional {}")
        log.info("{x}", x=None, log_system="a system")
        log.info("{x}", x=1, log_system=shown)
        log.failure("it broke {why}", Failure(ValueError("no")), why="because")
        publisher({"log_format": "no level, no namespace", "log_time": 1.5})
        publisher({"log_format": "no time {x}", "x": 1})
        publisher({"message": "no format", "log_time": 2.0})
        publisher({"log_format": b"bytes {x}", "x": 2, "log_time": 3.0})
        for when in (1_700_000_000.0, 1_700_000_000.9, 1_700_000_001.2, 1_700_003_600.5,
                     -0.5, 0.0):
            publisher({"log_format": "at {w}", "w": when, "log_time": when,
                       "log_namespace": "n", "log_level": LogLevel.debug})
    finally:
        monkeypatch.undo()
        time.tzset()
    assert ours.getvalue() == stock.getvalue()
    assert ours.getvalue().count("\n") > 20 and "Traceback" in ours.getvalue()


def test_lines_past_the_bound_are_counted_and_told_once_a_second(captured):
    """Past job_lines a second, job lines are not written but counted, and
    one line at the end of the second says how many of each kind; the next
    second writes again."""
    clock = Clock()
    job_log = JobLog(clock, 3)
    job_log.write([_started(f"j{i}") for i in range(5)])
    job_log.write([JobEvent("j0", JobState.SUCCEEDED, None, 9, 0.0, JobState.RUNNING, 1,
                            0, None, "alice", None, "local@h")])
    assert len(captured) == 3
    assert clock.getDelayedCalls()
    clock.advance(1.0)
    assert formatEvent(captured[-1]) == (
        "3 job lines not written in the last second (more than [log] job_lines = 3 "
        "a second): 2 started, 1 succeeded"
    )
    assert captured[-1]["skipped"] == {"started": 2, "succeeded": 1}
    assert not clock.getDelayedCalls()
    job_log.write([_started("k")])
    assert formatEvent(captured[-1]) == "job k attempt 1 started on local@h"
    job_log.stop()
    assert not clock.getDelayedCalls()


def test_quiet_makes_nothing_and_stop_tells_what_was_left(captured):
    """A job log that is quiet (the level leaves info out) logs nothing; one
    stopped within a second tells the lines it held back and leaves no
    timer."""
    clock = Clock()
    job_log = JobLog(clock, 0)
    job_log.quiet = True
    job_log.write([_started("j")])
    assert captured == [] and not clock.getDelayedCalls()
    job_log.quiet = False
    job_log.write([_started("j")])
    assert captured == []
    job_log.stop()
    assert [e["skipped"] for e in captured] == [{"started": 1}]
    assert not clock.getDelayedCalls()


class Daemon:
    """A twistd -n dispatcher whose log goes to DIR/out.log, in the format
    its ini file says."""

    def __init__(self, workdir, ini):
        self.workdir = str(workdir)
        self.config = os.path.join(self.workdir, "dispatcher.ini")
        with open(self.config, "w") as f:
            f.write(as_the_tests_account(ini))
        self.logpath = os.path.join(self.workdir, "out.log")
        self.process = None
        self.url = None

    def start(self, pattern, timeout=20):
        """Start it and wait until its log matches C{pattern}, whose group
        is the port."""
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.out = open(self.logpath, "ab")
        self.process = subprocess.Popen(
            [os.path.join(BIN, "twistd"), "-n", "--pidfile", "", "dispatcher",
             "--config", self.config, "--listen", "tcp:0:interface=127.0.0.1",
             "--data-dir", os.path.join(self.workdir, "data")],
            cwd=self.workdir, env=env, stdout=self.out, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.findall(pattern, self.text())
            if found:
                self.url = f"http://127.0.0.1:{found[-1]}"
                return
            assert self.process.poll() is None, self.text()
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in {self.text()}")

    def text(self):
        with open(self.logpath, encoding="utf-8") as f:
            return f.read()

    def request(self, method, path, body=None):
        with open(os.path.join(self.workdir, "data", "admin.token")) as f:
            token = f.read().strip()
        req = urllib.request.Request(
            self.url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as response:
            return json.loads(response.read())

    def wait(self, job_id, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.request("GET", f"/v1/jobs/{job_id}")
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} stayed {job['state']}")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
        self.out.close()


@pytest.fixture
def daemons(tmp_path):
    made = []

    def make(ini=""):
        daemon = Daemon(tmp_path, ini)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()


def test_json_log_holds_a_jobs_life_with_its_fields(daemons):
    """With [log] format = json, twistd's log is twisted.logger's JSON, read
    back by eventsFromJSONLogFile: the start-up lines, then a job's
    submission, start and end, each with job_id, owner, attempt and holder
    as fields."""
    daemon = daemons("[log]\nformat = json\n")
    daemon.start(r'"address": "127\.0\.0\.1:(\d+)"')
    job = daemon.request("POST", "/v1/jobs", {"command": ["sh", "-c", "exit 3"]})
    assert daemon.wait(job["id"])["state"] == "failed"
    daemon.stop()
    with open(daemon.logpath, encoding="utf-8") as f:
        events = list(eventsFromJSONLogFile(f))
    assert len(events) > 10
    text = "\n".join(formatEvent(e) for e in events)
    assert "Traceback" not in text
    mine = [e for e in events if e.get("job_id") == job["id"]]
    assert [e["log_namespace"] for e in mine] == [
        "dispatcher.api._handlers", "dispatcher.core._joblog", "dispatcher.core._joblog"]
    submitted, started, ended = mine
    assert submitted["owner"] == "admin" and submitted["log_level"] is LogLevel.info
    assert (started["owner"], started["attempt"], started["state"]) == ("admin", 1, "running")
    assert started["holder"].startswith("local@")
    assert (ended["state"], ended["exit_code"], ended["attempt"], ended["holder"]) == (
        "failed", 3, 1, started["holder"])
    assert formatEvent(ended) == f"job {job['id']} attempt 1 failed on {started['holder']} (exit code 3)"
    version = subprocess.run([os.path.join(BIN, "twistd"), "dispatcher", "--version"],
                             capture_output=True, text=True, timeout=60, cwd=daemon.workdir)
    ready = [e for e in events if "task_count" in e]
    assert len(ready) == 1
    assert ready[0]["slots"] == 8 and ready[0]["queues"] == "default"
    assert version.stdout.startswith(f"dispatcher {ready[0]['version']} (Twisted ")


def test_text_start_up_says_what_it_runs_and_nothing_else(daemons, tmp_path):
    """A first start says, in a few text lines, the dispatcher's version, the
    configuration file, the data directory, the address, slots, threads,
    tasks, queues and whether credentials are needed; a new store is one
    line, not one a migration, and no factory's object address shows."""
    daemon = daemons(
        "[executor]\nslots = 3\nthreads = 2\n[tasks]\nadd = tests.tasks:add\n"
        "[queue:gpu]\nmax_running = 1\n")
    daemon.start(r"dispatcher listening on 127\.0\.0\.1:(\d+)")
    daemon.stop()
    text = daemon.text()
    data_dir = os.path.join(str(tmp_path), "data")
    assert re.search(
        rf"dispatcher \d\S* starting: configuration {re.escape(daemon.config)}, data "
        rf"directory {re.escape(data_dir)}\n", text)
    assert re.search(
        r"dispatcher listening on 127\.0\.0\.1:\d+: 3 slots, 2 task threads; 1 tasks "
        r"\(add\); 2 queues \(default, gpu\); credentials required\n", text)
    assert f"made a new store {data_dir}/dispatcher.sqlite3 (schema version " in text
    assert "migrated to schema version" not in text
    assert " object at 0x" not in text and "Starting factory" not in text


def test_a_workers_arrival_lease_expiry_and_leaving_are_logged(
        dispatcher, start_worker, tmp_path):  # noqa: F811
    """A real twistd's log tells a real worker's arrival, its job's start on
    it, the expiry of its lease once it is stopped (SIGSTOP) past
    lease_seconds, the attempt ended without a result, and the worker's
    leaving (once, unheard for a lease's life): each line naming the worker
    and the job; and
    /metrics counts the worker connected, then the lease expired, then no
    worker."""
    worker = start_worker(dispatcher.url, "w-logged", 1)
    job = submit(dispatcher, {"command": ["sleep", "300"], "max_attempts": 2})
    dispatcher.wait(job["id"], ("running",))
    poll(lambda: "attempt 1 leased" in worker.output(), what="the lease")
    found = samples(scrape(dispatcher)[2])
    assert value(found, "dispatcher_workers_connected") == 1
    assert value(found, "dispatcher_leases_expired_total") == 0
    worker.process.send_signal(signal.SIGSTOP)
    try:
        poll(lambda: get(dispatcher, job["id"])["state"] == "queued", timeout=30,
             what="the lease to expire")
    finally:
        worker.process.send_signal(signal.SIGCONT)
    worker.kill()
    out = tmp_path / "out.log"
    poll(lambda: "worker w-logged left" in out.read_text(), timeout=30,
         what="the worker to be told gone")
    found = samples(scrape(dispatcher)[2])
    assert value(found, "dispatcher_workers_connected") == 0
    assert value(found, "dispatcher_leases_expired_total") == 1
    text = out.read_text()
    job_id = job["id"]
    lines = [
        "worker w-logged connected",
        f"job {job_id} attempt 1 started on w-logged",
        f"the lease of job {job_id} attempt 1 on worker w-logged expired: no heartbeat",
        f"job {job_id} attempt 1 on w-logged ended without a result",
    ]
    at = [text.find(line) for line in lines]
    assert -1 not in at and at == sorted(at), (lines, at, text)
    # Unheard for a lease's life with no request open, it left as its
    # lease ran out (either line may come first).
    assert text.count("worker w-logged left") == 1
    assert text.find("worker w-logged left") > at[1]
    assert "Traceback" not in text
