"""
The real daemon as users run it: the twistd plugin, a bad configuration,
SIGKILL and restart, and SIGTERM's grace period.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import twisted
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

from .conftest import as_the_tests_account

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_plugin_is_found():
    """twistd finds the dispatcher plugin through getPlugins(IServiceMaker)."""
    makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "dispatcher" in makers
    assert makers["dispatcher"].module == "dispatcher.app.tap"
    assert makers["dispatcher"].options().__module__ == "dispatcher.app.tap"


class Twistd:
    """A `twistd -n dispatcher` process in a directory of its own."""

    def __init__(self, workdir, ini="", program="twistd",
                 listen="tcp:0:interface=127.0.0.1", preexec_fn=None, tests_account=True):
        self.workdir = workdir
        self.listen = listen
        # Run in the child before twistd starts (to set its limits, say).
        self.preexec_fn = preexec_fn
        self.config = os.path.join(workdir, "dispatcher.ini")
        with open(self.config, "w") as f:
            # tests_account=False: the daemon's own choice of account.
            f.write(as_the_tests_account(ini) if tests_account else ini)
        self.program = program
        self.process = None
        self.url = None
        self.output = b""

    def start(self, timeout=20):
        env = dict(os.environ, PYTHONPATH=ROOT)
        args = [os.path.join(BIN, self.program)]
        if self.program == "twistd":
            args += ["-n", "--pidfile", "", "dispatcher"]
        else:
            args += ["--log-format", "text", "dispatcher"]
        args += ["--config", self.config, "--listen", self.listen,
                 "--data-dir", os.path.join(self.workdir, "data")]
        logpath = os.path.join(self.workdir, "out.log")
        offset = os.path.getsize(logpath) if os.path.exists(logpath) else 0
        self.log = open(logpath, "ab")
        self.process = subprocess.Popen(
            args, cwd=self.workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=self.preexec_fn)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(logpath) as f:
                f.seek(offset)
                text = f.read()
            found = re.findall(r"dispatcher listening on [\d.]+:(\d+)", text)
            if found:
                self.url = f"http://127.0.0.1:{found[-1]}"
                return
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited: {text}")
            time.sleep(0.05)
        raise AssertionError("twistd did not start listening")

    @property
    def token(self):
        """The admin token the daemon made on its first start, if it did."""
        try:
            with open(os.path.join(self.workdir, "data", "admin.token")) as f:
                return f.read().strip()
        except FileNotFoundError:
            return None

    def request(self, method, path, body=None, token=None):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        # token="": no credential at all.
        token = self.token if token is None else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def wait(self, job_id, states, timeout=20, token=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, job = self.request("GET", f"/v1/jobs/{job_id}", token=token)
            # An error answer (a 503 while the store comes back) is not
            # yet an answer: asked again until the deadline.
            if code == 200 and job["state"] in states:
                return job
            time.sleep(0.05)
        raise AssertionError(f"job stayed {job.get('state', job)} ({code})")

    def kill(self, signum):
        self.process.send_signal(signum)
        code = self.process.wait(timeout=30)
        self.log.close()
        return code

    def stop_gracefully(self):
        """SIGTERM, and check that it shut down in order: twistd then exits with
        the signal, so the exit code alone cannot tell."""
        assert self.kill(signal.SIGTERM) in (0, -signal.SIGTERM)
        text = open(os.path.join(self.workdir, "out.log")).read()
        assert "dispatcher stopped" in text.split("Received SIGTERM")[-1]

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.kill(signal.SIGKILL)


@pytest.fixture
def twistd(tmp_path):
    made = []

    def make(ini="", program="twistd"):
        t = Twistd(str(tmp_path), ini, program)
        made.append(t)
        return t

    yield make
    for t in made:
        t.stop()


@pytest.mark.parametrize("ini, message", [
    ("[executor]\nslots = lots\n",
     "[executor] slots = 'lots': expected an integer of at least 0"),
    ("[server]\nlisten = tcp:0\n[api]\nauthentication = off\n",
     "[server] listen = 'tcp:0:backlog=4096': the API would listen on every interface"),
    ("[server]\nlisten = tcp:http\n",
     "[server] listen = 'tcp:http:backlog=4096': not a Twisted endpoint"),
])
def test_bad_config_stops_startup(tmp_path, ini, message):
    """A wrong value, an endpoint Twisted cannot parse, or one that other
    machines reach without the tokens, stops start-up with one line naming
    file, section, key and value, before anything starts."""
    config = tmp_path / "bad.ini"
    config.write_text(ini)
    result = subprocess.run(
        [os.path.join(BIN, "twistd"), "-n", "--pidfile", "", "dispatcher",
         "--config", str(config)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert f"{config}: {message}" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    # The exit status is twistd's: from Twisted 26.10 on it exits 1 after
    # a usage error; before, it printed the error and exited 0.
    if (twisted.version.major, twisted.version.minor) >= (26, 10):
        assert result.returncode == 1
    assert not (tmp_path / "var").exists()


def test_kill_and_restart_keeps_every_acknowledged_job(twistd, tmp_path):
    """After SIGKILL and a restart, every job that got a 201 is there, the job
    that was running is recorded as lost, and its process did not outlive
    the daemon."""
    daemon = twistd("[executor]\nslots = 1\n")
    daemon.start()
    pidfile = tmp_path / "pid"
    code, running = daemon.request("POST", "/v1/jobs", {
        "command": ["sh", "-c", f"echo $$ > {pidfile}; sleep 300"]})
    assert code == 201
    acknowledged = [running["id"]]
    for i in range(50):
        code, job = daemon.request("POST", "/v1/jobs", {"command": ["true"],
                                                        "labels": {"i": str(i)}})
        assert code == 201
        acknowledged.append(job["id"])
    daemon.wait(running["id"], ("running",))
    for _ in range(200):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        time.sleep(0.02)
    job_pid = int(pidfile.read_text())
    assert daemon.kill(signal.SIGKILL) == -signal.SIGKILL

    daemon.start()
    lost = daemon.wait(running["id"], ("failed",))
    assert "lost" in lost["error"]
    assert "lost" in lost["attempts"][0]["error"]
    # The spawner helper kills what runs when the daemon dies: nothing runs
    # on unwatched (a zombie waiting for init counts as ended).
    for _ in range(200):
        if not alive(job_pid):
            break
        time.sleep(0.02)
    else:
        raise AssertionError("the lost job's process was not killed")
    for job_id in acknowledged[1:]:
        assert daemon.wait(job_id, ("succeeded",))["state"] == "succeeded"
    seen, cursor = [], ""
    while True:
        code, page = daemon.request("GET", f"/v1/jobs?limit=17{cursor}")
        seen += [j["id"] for j in page["jobs"]]
        if not page["next_cursor"]:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert seen == acknowledged


def test_sigterm_requeues_after_grace(twistd):
    """On SIGTERM a running job gets the grace period, then is stopped and put
    back to queued without spending its attempt; the daemon exits cleanly."""
    daemon = twistd("[dispatcher]\nshutdown_grace = 3\n[executor]\nslots = 2\n")
    daemon.start()
    code, job = daemon.request("POST", "/v1/jobs", {"command": ["sleep", "300"]})
    code, quick = daemon.request("POST", "/v1/jobs", {"command": ["sleep", "0.5"]})
    # Both run when the stop begins: the quick one ends within the grace
    # period, the long one is stopped at its end.
    daemon.wait(job["id"], ("running",))
    daemon.wait(quick["id"], ("running", "succeeded"))
    started = time.monotonic()
    daemon.stop_gracefully()
    assert time.monotonic() - started < 10
    daemon = twistd("[executor]\nslots = 0\n", program="twist")
    daemon.start()
    code, after = daemon.request("GET", f"/v1/jobs/{job['id']}")
    assert after["state"] == "queued"
    assert "shutdown" in after["attempts"][0]["error"]
    assert after["attempts"][0]["exit_code"] is None
    code, done = daemon.request("GET", f"/v1/jobs/{quick['id']}")
    assert done["state"] == "succeeded"


def test_stuck_task_does_not_hang_shutdown(twistd):
    """A task that never returns does not hang SIGTERM past the grace period, and
    its job goes back to queued."""
    daemon = twistd("[dispatcher]\nshutdown_grace = 0.3\n"
                    "[tasks]\nblock = tests.tasks:block\n")
    daemon.start()
    code, job = daemon.request("POST", "/v1/jobs", {"task": "block", "args": [600]})
    daemon.wait(job["id"], ("running",))
    started = time.monotonic()
    daemon.stop_gracefully()
    assert time.monotonic() - started < 10
    daemon = twistd("[executor]\nslots = 0\n[tasks]\nblock = tests.tasks:block\n")
    daemon.start()
    code, after = daemon.request("GET", f"/v1/jobs/{job['id']}")
    assert after["state"] == "queued"


def test_plain_install_gives_the_plugin(tmp_path):
    """A plain (not editable) install carries the package and the plugin file,
    and its twistd knows the dispatcher command."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
         "--target", str(target), ROOT],
        check=True, capture_output=True, timeout=300)
    assert (target / "twisted" / "plugins" / "dispatcher_plugin.py").exists()
    assert not (target / "twisted" / "__init__.py").exists()
    env = dict(os.environ, PYTHONPATH=str(target))
    where = subprocess.run(
        [sys.executable, "-c", "import dispatcher; print(dispatcher.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(target))
    help_text = subprocess.run(
        [os.path.join(BIN, "twistd"), "dispatcher", "--help"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0, help_text.stderr
    assert "--data-dir" in help_text.stdout


def test_second_daemon_on_same_data_dir_refuses(twistd, tmp_path):
    """A second daemon on the same data directory refuses to start, saying
    why, and the first keeps its running job."""
    first = twistd()
    first.start()
    code, job = first.request("POST", "/v1/jobs", {"command": ["sleep", "300"]})
    first.wait(job["id"], ("running",))
    second = subprocess.run(
        [os.path.join(BIN, "twistd"), "-n", "--pidfile", "", "dispatcher",
         "--listen", "tcp:0:interface=127.0.0.1", "--data-dir",
         os.path.join(str(tmp_path), "data")],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT))
    assert "is in use by another dispatcher" in second.stdout + second.stderr
    code, still = first.request("GET", f"/v1/jobs/{job['id']}")
    assert still["state"] == "running"
    assert open(os.path.join(str(tmp_path), "data", "holder")).read().startswith("local@")
