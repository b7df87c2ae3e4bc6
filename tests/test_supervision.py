"""
The daemon under a supervisor, against a real twistd: SIGHUP reloads what
can change and says what cannot, a bad file on reload keeps the running
configuration, and a second SIGINT or SIGTERM stops at once without a
traceback.
"""

import json
import os
import signal
import time
import urllib.error
import urllib.request

import pytest

from .test_twistd import Twistd


@pytest.fixture
def twistd(tmp_path):
    made = []

    def make(ini="", program="twistd", preexec_fn=None):
        daemon = Twistd(str(tmp_path), ini, program, preexec_fn=preexec_fn)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.stop()


def log_after(daemon, offset, text, timeout=20):
    """Wait until the daemon's log, past C{offset}, holds C{text}; return
    that part of the log."""
    path = os.path.join(daemon.workdir, "out.log")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, encoding="utf-8") as f:
            f.seek(offset)
            found = f.read()
        if text in found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in {found}")


def log_size(daemon):
    return os.path.getsize(os.path.join(daemon.workdir, "out.log"))


def status_with(daemon, token):
    req = urllib.request.Request(daemon.url + "/v1/queues",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_sighup_reloads_tokens_limits_and_level_and_names_the_rest(twistd, tmp_path):
    """SIGHUP while a job runs: the job runs on; a new [api] token_file's
    token works and the old one is refused, max_array and the log level
    apply, and a changed idle timeout is named as waiting for a restart; the
    daemon keeps serving, and at the new level writes no job lines."""
    token = tmp_path / "api.token"
    token.write_text("first-token-0123456789\n")
    token.chmod(0o600)
    base = f"[api]\ntoken_file = {token}\n[executor]\nslots = 2\n"
    daemon = twistd(base)
    daemon.start()
    first, second = "first-token-0123456789", "second-token-0123456789"
    code, job = daemon.request("POST", "/v1/jobs", {"command": ["sleep", "300"]},
                               token=first)
    daemon.wait(job["id"], ("running",), token=first)
    assert status_with(daemon, "first-token-0123456789") == 200
    token.write_text("second-token-0123456789\n")
    with open(daemon.config, "a") as f:
        f.write("[dispatcher]\nmax_array = 2\n[server]\nidle_timeout = 5\n[log]\nlevel = warn\n")
    offset = log_size(daemon)
    daemon.process.send_signal(signal.SIGHUP)
    text = log_after(daemon, offset, "only a restart applies")
    assert "configuration " + daemon.config + " reloaded: applied [dispatcher] max_array, " \
        "[api] token_file, [log] level" in text
    assert "[server] idle_timeout changed, which only a restart applies" in text
    assert status_with(daemon, "first-token-0123456789") == 401
    assert status_with(daemon, "second-token-0123456789") == 200
    code, refused = daemon.request("POST", "/v1/jobs", {"command": ["true"], "array": 3},
                                   token=second)
    assert code == 400 and "max_array" in refused["error"]["message"], refused
    code, now = daemon.request("GET", f"/v1/jobs/{job['id']}", token=second)
    assert now["state"] == "running" and len(now["attempts"]) == 1
    # At warn, a job's lines (info) are no longer written.
    code, quick = daemon.request("POST", "/v1/jobs", {"command": ["true"]}, token=second)
    daemon.wait(quick["id"], ("succeeded",), token=second)
    offset_after = log_size(daemon)
    daemon.process.send_signal(signal.SIGHUP)
    log_after(daemon, offset_after, "only a restart applies")
    with open(os.path.join(daemon.workdir, "out.log"), encoding="utf-8") as f:
        assert quick["id"] not in f.read()[offset:]
    assert daemon.process.poll() is None


def test_sighup_reloads_the_queues(twistd):
    """SIGHUP applies the queues: a limit raised starts the jobs waiting
    behind it at once, a queue added takes submissions (with its
    defaults) and shows in GET /v1/queues, and one removed refuses them;
    the job already running runs on."""
    daemon = twistd("[executor]\nslots = 4\n[queue:gpu]\nmax_running = 1\n")
    daemon.start()
    jobs = [daemon.request("POST", "/v1/jobs", {"command": ["sleep", "300"], "queue": "gpu"})[1]
            for _ in range(3)]
    daemon.wait(jobs[0]["id"], ("running",))
    code, waiting = daemon.request("GET", f"/v1/jobs/{jobs[1]['id']}")
    assert waiting["state"] == "queued" and "limit of 1" in waiting["wait_reason"]
    code, refused = daemon.request("POST", "/v1/jobs", {"command": ["true"], "queue": "cpu"})
    assert code == 400, refused
    with open(daemon.config, "w") as f:
        f.write("[executor]\nslots = 4\n[queue:gpu]\nmax_running = 3\n"
                "[queue:cpu]\npriority = 7\n")
    offset = log_size(daemon)
    daemon.process.send_signal(signal.SIGHUP)
    text = log_after(daemon, offset, "reloaded")
    assert "applied [queue:cpu], [queue:gpu]" in text, text
    for job in jobs:
        daemon.wait(job["id"], ("running",))
    code, queues = daemon.request("GET", "/v1/queues")
    queues = queues["queues"]
    assert queues["gpu"]["max_running"] == 3 and queues["gpu"]["running"] == 3, queues
    assert "cpu" in queues, queues
    code, cpu = daemon.request("POST", "/v1/jobs", {"command": ["true"], "queue": "cpu"})
    assert code == 201 and cpu["priority"] == 7, cpu
    assert daemon.wait(cpu["id"], ("succeeded",))["state"] == "succeeded"
    with open(daemon.config, "w") as f:
        f.write("[executor]\nslots = 4\n[queue:gpu]\nmax_running = 3\n")
    offset = log_size(daemon)
    daemon.process.send_signal(signal.SIGHUP)
    log_after(daemon, offset, "reloaded")
    code, refused = daemon.request("POST", "/v1/jobs", {"command": ["true"], "queue": "cpu"})
    assert code == 400 and "cpu" in refused["error"]["message"], refused
    code, first = daemon.request("GET", f"/v1/jobs/{jobs[0]['id']}")
    assert first["state"] == "running" and len(first["attempts"]) == 1


def test_a_bad_file_on_reload_keeps_the_running_configuration(twistd):
    """A configuration that no longer loads is one warning line on SIGHUP,
    and the daemon runs on as it was."""
    daemon = twistd("[executor]\nslots = 1\n")
    daemon.start()
    with open(daemon.config, "a") as f:
        f.write("[log]\nlevel = loud\n")
    offset = log_size(daemon)
    daemon.process.send_signal(signal.SIGHUP)
    text = log_after(daemon, offset, "configuration not reloaded")
    line = [l for l in text.splitlines() if "configuration not reloaded" in l]
    assert len(line) == 1
    assert f"{daemon.config}: [log] level = 'loud': expected one of debug, info" in line[0]
    assert "Traceback" not in text
    code, job = daemon.request("POST", "/v1/jobs", {"command": ["true"]})
    assert daemon.wait(job["id"], ("succeeded",))["state"] == "succeeded"


def interrupt_at_its_default():
    """In the daemon's child before it starts: SIGINT at its default, as a
    shell starts a command in the foreground (the reactor takes over SIGINT
    only from Python's own handler, never from an inherited SIG_IGN)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_at_once_without_a_traceback(twistd, signum):
    """While a stop waits out the grace period for a running job, a second
    SIGTERM (a supervisor's) or SIGINT (Ctrl-C at a terminal) stops it at
    once: the job goes back to the queue, its attempt not counted, the
    process exits well within the grace period, and nothing prints a
    traceback (a second Ctrl-C used to print ReactorNotRunning)."""
    daemon = twistd("[dispatcher]\nshutdown_grace = 120\n[executor]\nslots = 1\n"
                    "kill_grace = 1\n", preexec_fn=interrupt_at_its_default)
    daemon.start()
    code, job = daemon.request("POST", "/v1/jobs", {"command": ["sleep", "300"]})
    daemon.wait(job["id"], ("running",))
    offset = log_size(daemon)
    daemon.process.send_signal(signum)
    log_after(daemon, offset, "waiting up to 120.0 s for 1 running jobs")
    started = time.monotonic()
    daemon.process.send_signal(signum)
    daemon.process.wait(timeout=30)
    assert time.monotonic() - started < 15
    daemon.log.close()
    with open(os.path.join(daemon.workdir, "out.log"), encoding="utf-8") as f:
        text = f.read()[offset:]
    name = signal.Signals(signum).name
    assert f"Received {name}, shutting down." in text
    assert f"{name} again: not waiting for running jobs" in text
    assert "Traceback" not in text and "ReactorNotRunning" not in text
    assert "dispatcher stopped" in text
    again = twistd("[executor]\nslots = 0\n", program="twist")
    again.start()
    code, after = again.request("GET", f"/v1/jobs/{job['id']}")
    assert after["state"] == "queued"
    assert "shutdown" in after["attempts"][0]["error"]
