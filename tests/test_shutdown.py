"""
SIGTERM's grace period as clients see it: a real twistd keeps listening
while its running jobs are handled, and answers every new request (a
health check too) 503 shutting_down rather than refusing the connection.
"""

import json
import os
import signal
import time
import urllib.error
import urllib.request

import pytest

from .test_twistd import twistd  # noqa: F401 (a fixture)


def ask(url, method="GET", body=None, token=None):
    """One request on a fresh connection: its status, its JSON body and its
    Connection header."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read()), response.headers["Connection"]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers["Connection"]


def test_sigterm_answers_503_during_the_grace_period(twistd, tmp_path):  # noqa: F811
    """After SIGTERM, while a running job has its grace period, the daemon
    still accepts connections and answers a submission, a read and the health
    check 503 shutting_down (closing each connection); once the job has
    ended it stops listening and exits, and the job's end is recorded."""
    go = tmp_path / "go"
    daemon = twistd("[dispatcher]\nshutdown_grace = 30\n[executor]\nslots = 1\n")
    daemon.start()
    code, job = daemon.request("POST", "/v1/jobs", {
        "command": ["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.02; done"]})
    assert code == 201
    daemon.wait(job["id"], ("running",))
    assert ask(daemon.url + "/healthz")[0] == 200

    daemon.process.send_signal(signal.SIGTERM)
    log = os.path.join(str(tmp_path), "out.log")
    deadline = time.monotonic() + 10
    while "for 1 running jobs" not in open(log).read():
        assert time.monotonic() < deadline, open(log).read()
        time.sleep(0.02)
    for method, path, body in [
        ("POST", "/v1/jobs", {"command": ["true"]}),
        ("GET", f"/v1/jobs/{job['id']}", None),
        ("GET", "/healthz", None),
    ]:
        code, answer, connection = ask(daemon.url + path, method, body, daemon.token)
        assert code == 503, (path, answer)
        assert answer["error"]["code"] == "shutting_down"
        assert connection == "close"
    assert daemon.process.poll() is None

    go.write_text("")
    assert daemon.process.wait(timeout=20) in (0, -signal.SIGTERM)
    daemon.log.close()
    text = open(log).read().split("Received SIGTERM")[-1]
    assert "dispatcher stopped" in text
    with pytest.raises(urllib.error.URLError):
        ask(daemon.url + "/healthz")

    restarted = twistd("[executor]\nslots = 0\n")
    restarted.start()
    code, after = restarted.request("GET", f"/v1/jobs/{job['id']}")
    assert after["state"] == "succeeded"
    # Nothing was stored from the refused submission.
    code, page = restarted.request("GET", "/v1/jobs")
    assert [j["id"] for j in page["jobs"]] == [job["id"]]
