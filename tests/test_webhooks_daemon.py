"""
Webhooks as users rely on them, against a real C{twistd} and a real HTTP
receiver on 127.0.0.1 (an ephemeral port): a job's final state posted
once with a valid signature; a failed post posted again later; the
deliveries pending when the daemon is killed (SIGKILL) posted after the
restart; the address policy at submission and at delivery; the states a
job names; and no webhooks without a secret.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import threading
import time

import pytest

from .test_twistd import Twistd
from .test_webhooks import verify

SECRET = "integration-webhook-secret-0123456789"

# Back-offs shortened: a failed post is tried again within a second.
FAST = """
[webhooks]
secret_file = {secret}
retry_delay = 0.2
max_delay = 0.4
poll_interval = 0.05
timeout = 5
"""


class Receiver:
    """
    A real HTTP server on 127.0.0.1 that keeps every post, by path, and
    answers each path with its script of statuses (the last repeats; 200
    for a path without one).
    """

    def __init__(self):
        self.posts: dict[str, list[dict]] = {}
        self.scripts: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    got = receiver.posts.setdefault(self.path, [])
                    got.append({"at": time.time(), "headers": dict(self.headers),
                                "body": body})
                    script = receiver.scripts.get(self.path, [200])
                    code = script[min(len(got) - 1, len(script) - 1)]
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def got(self, path):
        with self.lock:
            return list(self.posts.get(path, []))

    def wait(self, path, count, timeout=20.0):
        """The posts to C{path}, once there are C{count} of them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.got(path)
            if len(got) >= count:
                return got
            time.sleep(0.02)
        raise AssertionError(f"{path} got {len(self.got(path))} posts, not {count}")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "webhook.secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def daemons(tmp_path):
    made = []

    def make(ini, name="d"):
        workdir = tmp_path / name
        workdir.mkdir()
        daemon = Twistd(str(workdir), ini)
        made.append(daemon)
        daemon.start()
        return daemon

    yield make
    for daemon in made:
        daemon.stop()


def allowed(secret_file, slots=2):
    """A daemon's ini: webhooks on, loopback allowed (the receiver is
    there), back-offs short."""
    return (FAST.format(secret=secret_file)
            + f"[fetch]\nallow = 127.0.0.1/32\n[executor]\nslots = {slots}\n")


def event_of(post):
    return json.loads(post["body"])


def test_a_final_state_is_posted_once_signed(daemons, receiver, secret_file):
    """A job that names a webhook has its final state posted once: the job
    event as JSON, its id in Dispatcher-Event-Id, signed with the secret
    as the documented check verifies; the job shows its notify."""
    daemon = daemons(allowed(secret_file))
    code, job = daemon.request("POST", "/v1/jobs", {
        "command": ["true"], "name": "hooked",
        "notify": {"url": receiver.url("/once")}})
    assert code == 201, job
    assert job["notify"] == {"url": receiver.url("/once"),
                             "events": ["succeeded", "failed", "cancelled"]}
    (post,) = receiver.wait("/once", 1)
    event = event_of(post)
    assert event["job_id"] == job["id"]
    assert (event["state"], event["previous"]) == ("succeeded", "running")
    assert (event["name"], event["queue"], event["attempt"], event["exit_code"]) == (
        "hooked", "default", 1, 0)
    assert event["owner"] == "admin"
    assert post["headers"]["Dispatcher-Event-Id"] == str(event["id"])
    assert post["headers"]["Content-Type"] == "application/json"
    assert verify(SECRET.encode(), post["headers"]["Dispatcher-Signature"], post["body"],
                  now=time.time())
    assert not verify(b"not-the-secret-0123456789", post["headers"]["Dispatcher-Signature"],
                      post["body"], now=time.time())
    time.sleep(1.0)
    assert len(receiver.got("/once")) == 1


def test_a_failed_post_is_posted_again_later(daemons, receiver, secret_file):
    """A receiver that answers 500 gets the same delivery again after the
    back-off, and no more once it answers 200."""
    receiver.scripts["/flaky"] = [500, 200]
    daemon = daemons(allowed(secret_file))
    code, job = daemon.request("POST", "/v1/jobs", {
        "command": ["true"], "notify": {"url": receiver.url("/flaky")}})
    assert code == 201, job
    first, second = receiver.wait("/flaky", 2)
    assert first["body"] == second["body"]
    assert first["headers"]["Dispatcher-Event-Id"] == second["headers"]["Dispatcher-Event-Id"]
    # retry_delay = 0.2, drawn between half and one and a half of it.
    assert second["at"] - first["at"] >= 0.1
    time.sleep(1.0)
    assert len(receiver.got("/flaky")) == 2


def test_pending_deliveries_survive_sigkill(daemons, receiver, secret_file):
    """Deliveries not yet delivered when the daemon is killed (SIGKILL) are
    posted after the restart, each job's final state at least once."""
    receiver.scripts["/down"] = [503]
    daemon = daemons(allowed(secret_file, slots=4))
    jobs = []
    for i in range(5):
        code, job = daemon.request("POST", "/v1/jobs", {
            "command": ["true"], "notify": {"url": receiver.url("/down")}})
        assert code == 201, job
        jobs.append(job["id"])
    for job_id in jobs:
        daemon.wait(job_id, ("succeeded",))
    receiver.wait("/down", 5)
    assert daemon.kill(signal.SIGKILL) == -signal.SIGKILL
    receiver.scripts["/down"] = [200]
    tried = len(receiver.got("/down"))
    daemon.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        got = receiver.got("/down")[tried:]
        if {event_of(p)["job_id"] for p in got} == set(jobs):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the deliveries pending at the kill were not all posted")
    assert {event_of(p)["state"] for p in got} == {"succeeded"}


def test_the_states_a_job_names_are_posted_and_no_other(daemons, receiver, secret_file):
    """A job posts the changes to the states it names, in order, and no
    other: running and failed, not queued nor succeeded."""
    daemon = daemons(allowed(secret_file))
    urls = {}
    for command, path in ((["true"], "/ok"), (["false"], "/bad")):
        code, job = daemon.request("POST", "/v1/jobs", {
            "command": command,
            "notify": {"url": receiver.url(path), "events": ["running", "failed"]}})
        assert code == 201, job
        assert job["notify"]["events"] == ["running", "failed"]
        urls[path] = job["id"]
        daemon.wait(job["id"], ("succeeded", "failed"))
    (ok,) = receiver.wait("/ok", 1)
    running, failed = sorted(receiver.wait("/bad", 2), key=lambda p: event_of(p)["id"])
    time.sleep(1.0)
    assert [event_of(p)["state"] for p in receiver.got("/ok")] == ["running"]
    assert (event_of(running)["state"], event_of(failed)["state"]) == ("running", "failed")
    assert event_of(failed)["exit_code"] == 1
    assert len(receiver.got("/bad")) == 2


def test_loopback_is_refused_unless_allowed(daemons, receiver, secret_file, tmp_path):
    """Without [fetch] allow, a webhook to a loopback address is refused at
    submission (400 naming notify.url, saying what lets it through), and
    one to a name that resolves to loopback is never connected to: it is
    given up with a log line.  (With the address allowed, the other tests
    post to it.)"""
    daemon = daemons(FAST.format(secret=secret_file))
    code, error = daemon.request("POST", "/v1/jobs", {
        "command": ["true"], "notify": {"url": receiver.url("/refused")}})
    assert code == 400
    assert error["error"]["field"] == "notify.url"
    assert "127.0.0.1 is in 127.0.0.0/8 (loopback)" in error["error"]["message"]
    assert "[fetch] allow" in error["error"]["message"]
    code, error = daemon.request("POST", "/v1/jobs/batch", {"jobs": [
        {"command": ["true"]},
        {"command": ["true"], "notify": {"url": f"http://[::1]:{receiver.port}/x"}}]})
    assert code == 400 and error["error"]["field"] == "jobs[1].notify.url"
    code, job = daemon.request("POST", "/v1/jobs", {
        "command": ["true"],
        "notify": {"url": f"http://localhost:{receiver.port}/by-name"}})
    assert code == 201, job
    daemon.wait(job["id"], ("succeeded",))
    log = os.path.join(daemon.workdir, "out.log")
    deadline = time.monotonic() + 20
    while "gave up the webhook of job " + job["id"] not in open(log).read():
        assert time.monotonic() < deadline, open(log).read()[-3000:]
        time.sleep(0.05)
    assert "webhooks are not posted there unless [fetch] allow" in open(log).read()
    assert receiver.got("/by-name") == []


def test_notify_without_a_secret_is_refused(daemons):
    """A dispatcher with no [webhooks] secret_file refuses a job that names
    notify, saying what to configure, and stores nothing."""
    daemon = daemons("[executor]\nslots = 0\n")
    code, error = daemon.request("POST", "/v1/jobs", {
        "command": ["true"], "notify": {"url": "https://hooks.example/x"}})
    assert code == 400
    assert error["error"]["field"] == "notify"
    assert "[webhooks] secret_file" in error["error"]["message"]
    code, page = daemon.request("GET", "/v1/jobs")
    assert page["jobs"] == []


def test_a_secret_others_may_read_stops_the_start(tmp_path, secret_file):
    """A secret file that group or others may read stops the start with one
    line naming it and the fix."""
    secret_file.chmod(0o644)
    daemon = Twistd(str(tmp_path), FAST.format(secret=secret_file))
    with pytest.raises(AssertionError, match="twistd exited") as info:
        daemon.start()
    assert f"{secret_file} ([webhooks] secret_file) has mode 0644" in str(info.value)
    assert f"chmod 600 {secret_file}" in str(info.value)
