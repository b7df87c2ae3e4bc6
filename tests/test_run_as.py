"""
Jobs run as someone else: a daemon running as root runs each command job
as an unprivileged account (its own choice, [executor] run_as, or the one
[run_as] gives the job's owner), which cannot reach the daemon's data, its
secrets, its environment or another account's job; the files the daemon
makes are its own alone whatever the umask, and a secret others could read
is refused at start.

The tests that change accounts need root, and make throwaway accounts
(removed at the end); elsewhere they skip saying so.
"""

import grp
import hashlib
import http.server
import json
import os
import pathlib
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString

from dispatcher.app._daemon import CannotStart, DaemonService
from dispatcher.config._ini import ConfigError, parse_config, run_as
from dispatcher.execution._accounts import AccountRefused, job_accounts
from dispatcher.execution._executor import job_path
from dispatcher.execution._process import _HELPER

from .test_twistd import BIN, ROOT, Twistd, alive
from .test_worker import WorkerProcess

needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="running a job as another account needs root, and this run is not root",
)

# The admin token of the tests that configure one ([api] token_file).
ADMIN = "api-token-0123456789abc"

# What every directory and file the daemon makes is, whatever the umask.
DATA_DIR_MODE = 0o711


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def run(*argv):
    subprocess.run(argv, check=True, capture_output=True, text=True)


class Accounts:
    """Throwaway accounts made for these tests with useradd, removed at the
    end: two users, each in a group of its own, the first also in one more
    group."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.a, self.b = f"dspa{tag}", f"dspb{tag}"
        self.extra = f"dspx{tag}"
        self.made_users, self.made_groups = [], []
        run("groupadd", self.extra)
        self.made_groups.append(self.extra)
        for user in (self.a, self.b):
            run("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                "--user-group", user)
            self.made_users.append(user)
        run("usermod", "-a", "-G", self.extra, self.a)

    def uid(self, user):
        return pwd.getpwnam(user).pw_uid

    def gid(self, user):
        return pwd.getpwnam(user).pw_gid

    def groups(self, user):
        return set(os.getgrouplist(user, self.gid(user)))

    def remove(self):
        for user in self.made_users:
            subprocess.run(["userdel", user], capture_output=True)
        for group in self.made_groups + self.made_users:
            # A user's own group goes with it; the extra one is ours.
            subprocess.run(["groupdel", group], capture_output=True)


@pytest.fixture(scope="module")
def accounts():
    if os.geteuid() != 0:
        pytest.skip("making throwaway accounts needs root, and this run is not root")
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    made = Accounts()
    yield made
    made.remove()


@pytest.fixture
def open_dir():
    """A directory others may pass through (as a data directory's parent
    must be for jobs of another account to reach their working directories
    by path; pytest's own tmp_path is 0700), removed at the end."""
    path = tempfile.mkdtemp(prefix="dsp-runas-", dir="/tmp")
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemons():
    made = []

    def make(workdir, ini="", **kw):
        daemon = Twistd(workdir, ini, tests_account=False, **kw)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.stop()


def status_ids(text):
    """The Uid, Gid and Groups lines of a /proc/PID/status text, as numbers."""
    ids = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Uid", "Gid", "Groups", "CapPrm", "CapEff"):
            ids[key] = rest.split()
    return {
        "Uid": [int(n) for n in ids["Uid"]],
        "Gid": [int(n) for n in ids["Gid"]],
        "Groups": {int(n) for n in ids["Groups"]},
        "CapPrm": int(ids["CapPrm"][0], 16),
        "CapEff": int(ids["CapEff"][0], 16),
    }


# An interpreter every account may run (the suite's own may lie under a
# directory closed to others, as pyenv's under /root does).
PYTHON = "/usr/bin/python3"

# A job that tries to open each path it is given (to read, or to write for
# a path given as w:PATH, or to list for d:PATH) and prints what happened,
# as JSON; its own working directory first, by its absolute path, so that a
# refusal is known to come from the path's own mode.
PROBE = r"""
import json, os, sqlite3, sys
seen = {}
with open(os.path.join(os.environ["HOME"], "mine.txt"), "w") as f:
    f.write("mine")
seen["own"] = open(os.path.join(os.environ["HOME"], "mine.txt")).read()
for arg in sys.argv[1:]:
    kind, _, path = arg.partition(":")
    try:
        if kind == "r":
            open(path, "rb").close()
        elif kind == "w":
            open(path, "ab").close()
        elif kind == "d":
            os.listdir(path)
        elif kind == "sql":
            db = sqlite3.connect(f"file:{path}?mode=rw", uri=True)
            db.execute("UPDATE jobs SET command = '[\"rm\"]'")
            db.commit()
        seen[arg] = "opened"
    except OSError as e:
        seen[arg] = type(e).__name__
    except sqlite3.Error as e:
        seen[arg] = f"sqlite3: {e}"
with open("/proc/self/status") as f:
    seen["status"] = f.read()
print(json.dumps(seen))
"""


# Another owner's job: a secret in its working directory, its pid for the
# test, a line of log, and time to be looked at.
OTHER = "echo secret > secret.txt; echo $$ > pid.new && mv pid.new pid; echo other-log; exec sleep 60"


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def log_of(daemon, job_id, stream="stdout", token=None):
    import urllib.request

    request = urllib.request.Request(
        f"{daemon.url}/v1/jobs/{job_id}/log?stream={stream}",
        headers={"Authorization": f"Bearer {token or daemon.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


@needs_root
def test_a_job_of_another_account_reaches_nothing_of_the_daemon_or_another_job(
        accounts, open_dir, daemons):
    """A root daemon runs a job as [executor] run_as, with every uid, gid
    and group its account's and no capability, and another owner's job as
    the account [run_as] maps it to; the first cannot open the database
    (nor rewrite a job in it), the write-ahead log, the credentials, the
    token files, the lease key, the access log, the lock, the daemon's
    environment, the other job's working directory, files or log, nor list
    the data or jobs directory, while it uses its own working directory by
    its path."""
    if not os.access(PYTHON, os.X_OK):
        pytest.skip(f"the probe job needs {PYTHON}, which every account may run")
    api_token = os.path.join(open_dir, "api.token")
    with open(api_token, "w") as f:
        f.write(ADMIN + "\n")
    os.chmod(api_token, 0o600)
    daemon = daemons(open_dir, f"[executor]\nrun_as = {accounts.a}\nslots = 4\n"
                     f"[run_as]\nbob = {accounts.b}\n[api]\ntoken_file = {api_token}\n")
    daemon.start()
    data = os.path.join(open_dir, "data")
    code, made = daemon.request("POST", "/v1/credentials", {"name": "bob", "role": "submitter"},
                                token=ADMIN)
    assert code == 201, made
    bob = made["token"]
    code, other = daemon.request("POST", "/v1/jobs", {
        "command": ["sh", "-c", OTHER]}, token=bob)
    assert code == 201, other
    other_dir = os.path.join(data, "jobs", job_path(other["id"]))
    wait_for(lambda: os.path.exists(os.path.join(other_dir, "work", "pid")))
    with open(os.path.join(data, "lock")) as f:
        daemon_pid = int(f.read())

    targets = [
        f"r:{data}/dispatcher.sqlite3", f"w:{data}/dispatcher.sqlite3",
        f"sql:{data}/dispatcher.sqlite3", f"r:{data}/dispatcher.sqlite3-wal",
        f"r:{data}/credentials.json", f"r:{data}/lease.key",
        f"r:{data}/access.log", f"r:{data}/lock", f"r:{api_token}",
        f"r:/proc/{daemon_pid}/environ", f"d:{data}", f"d:{data}/jobs",
        f"d:{other_dir}", f"d:{other_dir}/work", f"r:{other_dir}/work/secret.txt",
        f"w:{other_dir}/work/planted", f"r:{other_dir}/attempt-1/stdout",
    ]
    code, probe = daemon.request("POST", "/v1/jobs", {
        "command": [PYTHON, "-I", "-S", "-c", PROBE, *targets]}, token=ADMIN)
    assert code == 201, probe
    done = daemon.wait(probe["id"], ("succeeded", "failed"), token=ADMIN)
    assert done["state"] == "succeeded", (done, log_of(daemon, probe["id"], "stderr", ADMIN))
    seen = json.loads(log_of(daemon, probe["id"], token=ADMIN))
    assert seen.pop("own") == "mine"
    ids = status_ids(seen.pop("status"))
    uid, gid = accounts.uid(accounts.a), accounts.gid(accounts.a)
    assert ids["Uid"] == [uid] * 4 and ids["Gid"] == [gid] * 4
    assert ids["Groups"] == accounts.groups(accounts.a)
    assert grp.getgrnam(accounts.extra).gr_gid in ids["Groups"]
    assert ids["CapPrm"] == 0 and ids["CapEff"] == 0
    assert seen.pop(f"sql:{data}/dispatcher.sqlite3").startswith("sqlite3: unable to open")
    assert seen == {target: "PermissionError" for target in targets if not target.startswith("sql:")}
    assert not os.path.exists(os.path.join(other_dir, "work", "planted"))

    # The other job runs as the account its owner is mapped to, and its
    # command is what bob submitted.
    with open(os.path.join(data, "jobs", job_path(other["id"]), "work", "secret.txt")) as f:
        assert f.read() == "secret\n"
    assert os.stat(os.path.join(other_dir, "work")).st_uid == accounts.uid(accounts.b)
    code, running = daemon.request("GET", f"/v1/jobs/{other['id']}", token=bob)
    assert running["command"] == ["sh", "-c", OTHER]
    with open(os.path.join(other_dir, "work", "pid")) as f:
        pid = int(f.read())
    with open(f"/proc/{pid}/status") as f:
        assert status_ids(f.read())["Uid"] == [accounts.uid(accounts.b)] * 4
    # Its log is served (the daemon reads it as root), to its owner too.
    assert log_of(daemon, other["id"], token=bob) == "other-log\n"
    code, _ = daemon.request("POST", f"/v1/jobs/{other['id']}/cancel", {}, token=bob)
    assert code == 202
    daemon.wait(other["id"], ("cancelled",), token=bob)


@needs_root
@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_files_are_the_daemons_alone_whatever_the_umask(open_dir, daemons, umask):
    """Started under umask 022 or 000, a root daemon told nothing runs
    command jobs as nobody (and logs so once), and what it makes is closed:
    the data directory 0711, every file in it 0600, the jobs directory, its
    buckets and each job's directory 0711, an attempt's directory 0700, its
    logs 0600 and the daemon's (the job writes pipes the spawner helper
    reads into them, which it may open again as /dev/stdout), the working
    directory 0700 and the job account's."""
    os.umask(umask)
    daemon = daemons(open_dir)
    daemon.start()
    code, job = daemon.request("POST", "/v1/jobs", {
        "command": ["sh", "-c",
                    "id -u; echo made > made.txt; echo again > /dev/stdout; echo err >&2"]})
    assert code == 201
    done = daemon.wait(job["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", done
    nobody = pwd.getpwnam("nobody")
    assert log_of(daemon, job["id"]) == f"{pwd.getpwnam('nobody').pw_uid}\nagain\n"
    output = open(os.path.join(open_dir, "out.log")).read()
    assert output.count("command jobs run as nobody:") == 1
    assert "[executor] run_as is unset" in output

    data = os.path.join(open_dir, "data")
    assert mode(data) == DATA_DIR_MODE
    names = set(os.listdir(data))
    assert {"dispatcher.sqlite3", "dispatcher.sqlite3-wal", "dispatcher.sqlite3-shm",
            "credentials.json", "admin.token", "lease.key", "access.log", "lock",
            "holder", "jobs"} <= names
    for name in names - {"jobs"}:
        assert mode(os.path.join(data, name)) == 0o600, name
    job_dir = os.path.join(data, "jobs", job_path(job["id"]))
    on_the_way = os.path.join(data, "jobs")
    for part in job_path(job["id"]).split("/"):
        on_the_way = os.path.join(on_the_way, part)
        assert mode(on_the_way) == 0o711, on_the_way
    assert mode(os.path.join(data, "jobs")) == 0o711
    assert mode(os.path.join(job_dir, "attempt-1")) == 0o700
    assert os.stat(os.path.join(job_dir, "attempt-1")).st_uid == 0
    for stream in ("stdout", "stderr"):
        log_file = os.path.join(job_dir, "attempt-1", stream)
        assert mode(log_file) == 0o600
        assert os.stat(log_file).st_uid == 0
    work = os.path.join(job_dir, "work")
    assert mode(work) == 0o700 and os.stat(work).st_uid == nobody.pw_uid
    assert os.stat(os.path.join(work, "made.txt")).st_uid == nobody.pw_uid
    # The job's own files are made with the umask it started with: 022, as
    # under a daemon of the usual umask (the daemon's own is 077).
    assert mode(os.path.join(work, "made.txt")) == 0o644


@needs_root
def test_modes_an_older_version_left_are_narrowed_at_start(open_dir, daemons):
    """A data directory whose modes an older version (or a wider umask)
    left open is narrowed at start, the log saying so once; the next start
    finds nothing to narrow."""
    daemon = daemons(open_dir, "[executor]\nrun_as = root\n")
    daemon.start()
    code, job = daemon.request("POST", "/v1/jobs", {"command": ["echo", "hi"]})
    daemon.wait(job["id"], ("succeeded",))
    daemon.stop_gracefully()
    data = os.path.join(open_dir, "data")
    secrets = {"credentials.json", "admin.token", "lease.key"}
    for directory, dirs, files in os.walk(data):
        os.chmod(directory, 0o755)
        for name in files:
            if name not in secrets:
                os.chmod(os.path.join(directory, name), 0o644)
    daemon.start()
    first = open(os.path.join(open_dir, "out.log")).read()
    assert first.count("narrowed the modes of") == 1
    job_dir = os.path.join(data, "jobs", job_path(job["id"]))
    assert mode(data) == 0o711
    assert mode(os.path.join(data, "dispatcher.sqlite3")) == 0o600
    assert mode(os.path.join(data, "access.log")) == 0o600
    assert mode(os.path.join(data, "jobs")) == 0o711
    assert mode(job_dir) == 0o711
    assert mode(os.path.join(job_dir, "work")) == 0o700
    assert mode(os.path.join(job_dir, "attempt-1")) == 0o700
    assert mode(os.path.join(job_dir, "attempt-1", "stdout")) == 0o600
    assert log_of(daemon, job["id"]) == "hi\n"
    daemon.stop_gracefully()
    daemon.start()
    assert open(os.path.join(open_dir, "out.log")).read().count("narrowed the modes of") == 1


@pytest.mark.parametrize("name, key", [
    ("api.token", "[api] token_file"),
    ("worker.token", "[workers] token_file"),
    ("data/admin.token", "the first admin token"),
    ("data/lease.key", "the lease token key"),
    ("data/credentials.json", "the credentials"),
])
def test_a_secret_others_may_read_is_refused_at_start(tmp_path, daemons, name, key):
    """A token file, the credentials, the first admin token or the lease key
    with mode 0666 stops the start with one line naming the file, its mode
    and the chmod that puts it right."""
    # (With an [api] token_file there is an admin: no admin.token is made.)
    api = "[api]\ntoken_file = api.token\n" if name == "api.token" else ""
    daemon = daemons(str(tmp_path), f"{api}[workers]\ntoken_file = worker.token\n")
    for token in ("api.token", "worker.token"):
        (tmp_path / token).write_text(f"{token}-0123456789abcdef\n")
        (tmp_path / token).chmod(0o600)
    daemon.start()
    daemon.stop_gracefully()
    path = tmp_path / name
    path.chmod(0o666)
    offset = os.path.getsize(tmp_path / "out.log")
    with pytest.raises(AssertionError, match="twistd exited"):
        daemon.start()
    assert daemon.process.wait(timeout=30) == 1
    said = open(tmp_path / "out.log").read()[offset:]
    shown = "api.token" if name == "api.token" else (
        "worker.token" if name == "worker.token" else str(path))
    line = [line for line in said.splitlines() if "could not start" in line]
    assert len(line) == 1, said
    assert f"{shown} ({key}) has mode 0666: group or others may read and write it; " \
           f"chmod 600 {shown}" in line[0]
    assert "Traceback" not in said


@needs_root
def test_a_token_file_of_another_user_is_refused(tmp_path, daemons):
    """A token file that belongs to another user than the daemon's is
    refused at start, naming its owner and the chown."""
    token = tmp_path / "api.token"
    token.write_text("api-token-0123456789abc\n")
    token.chmod(0o600)
    os.chown(token, pwd.getpwnam("nobody").pw_uid, -1)
    daemon = daemons(str(tmp_path), f"[api]\ntoken_file = {token}\n")
    with pytest.raises(AssertionError, match="twistd exited"):
        daemon.start()
    said = open(tmp_path / "out.log").read()
    assert f"{token} ([api] token_file) belongs to nobody, not to root" in said
    assert f"chown root {token}" in said


def test_a_workers_token_file_others_may_read_is_refused(tmp_path):
    """The worker refuses a --token-file that group or others may read,
    before it starts, with the same words."""
    token = tmp_path / "w.token"
    token.write_text("worker-token-0123456789\n")
    token.chmod(0o644)
    result = subprocess.run(
        [os.path.join(BIN, "dispatcher"), "worker", "--url", "http://127.0.0.1:1",
         "--token-file", str(token), "--slots", "1"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert (f"--token-file {token}: {token} (--token-file) has mode 0644: group or "
            f"others may read it; chmod 600 {token}") in result.stderr


@pytest.mark.parametrize("text, message", [
    ("0", "0 is uid 0, root: to run jobs as root, write run_as = root"),
    ("nobody:0", "0 is gid 0, root's group: write USER:root to mean it"),
    ("no-such-user-here",
     "no user no-such-user-here on this host; expected USER or USER:GROUP"),
    ("nobody:no-such-group", "no group no-such-group on this host"),
])
def test_root_and_strangers_are_refused_as_accounts(text, message):
    """An account that is root but not written as root, or no account of
    this host, is a configuration error naming the file, section, key and
    value; run_as = root written out is taken."""
    with pytest.raises(ConfigError) as e:
        parse_config(f"[executor]\nrun_as = {text}\n", "t.ini")
    assert str(e.value) == f"t.ini: [executor] run_as = {text!r}: {message}"
    with pytest.raises(ConfigError) as e:
        parse_config(f"[run_as]\nalice = {text}\n", "t.ini")
    assert str(e.value) == f"t.ini: [run_as] alice = {text!r}: {message}"
    assert parse_config("[executor]\nrun_as = root\n").executor.run_as.uid == 0


def test_the_map_picks_the_owners_account_and_others_get_run_as():
    """For a root process, an owner in [run_as] gets its account, any other
    owner (or none) [executor] run_as, or nobody when that is unset (with a
    note for the log); an owner that cannot be a credential's name is a
    configuration error."""
    config = parse_config("[executor]\nrun_as = daemon\n[run_as]\nalice = bin\n", "t.ini")
    accounts = job_accounts(config, euid=0)
    assert accounts.for_owner("alice").user == "bin"
    assert accounts.for_owner("bob").user == "daemon"
    assert accounts.for_owner(None).user == "daemon"
    assert accounts.note is None
    unset = job_accounts(parse_config("[run_as]\nalice = bin\n"), euid=0)
    assert unset.for_owner("bob").user == "nobody"
    assert "command jobs run as nobody:" in unset.note
    with pytest.raises(ConfigError) as e:
        parse_config("[run_as]\n-x = bin\n", "t.ini")
    assert str(e.value) == ("t.ini: [run_as] -x = 'bin': an owner is a credential's name: "
                            "letters, digits, _ . @ -, not starting with . @ or -")


def test_a_process_not_root_runs_jobs_as_itself_and_refuses_another_account():
    """A process that is not root runs jobs as its own user, with no change
    of ids (run_as naming that user is taken), and refuses a run_as or a
    map that names another, in one line saying what to do."""
    me = pwd.getpwnam("daemon")
    assert job_accounts(parse_config(""), euid=me.pw_uid).for_owner("x") is None
    assert job_accounts(
        parse_config("[executor]\nrun_as = daemon\n"), euid=me.pw_uid).for_owner("x") is None
    with pytest.raises(AccountRefused) as e:
        job_accounts(parse_config("[executor]\nrun_as = nobody\n", "t.ini"), euid=me.pw_uid)
    assert str(e.value) == (
        "t.ini: [executor] run_as = 'nobody:nogroup': this process runs as daemon, not "
        "root, so its jobs can only run as daemon; remove the setting, or start it as root")
    with pytest.raises(AccountRefused, match=r"\[run_as\] alice = 'bin:bin': this process"):
        job_accounts(parse_config("[run_as]\nalice = bin\n", "t.ini"), euid=me.pw_uid)


@needs_root
def test_a_root_daemon_runs_jobs_as_root_when_told_so(open_dir, daemons):
    """run_as = root written out runs a command job as root."""
    daemon = daemons(open_dir, "[executor]\nrun_as = root\n")
    daemon.start()
    code, job = daemon.request("POST", "/v1/jobs", {"command": ["id", "-u"]})
    daemon.wait(job["id"], ("succeeded",))
    assert log_of(daemon, job["id"]) == "0\n"


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """A local HTTP server of one file, in a thread."""
    root = tmp_path / "served"
    root.mkdir()
    (root / "data.txt").write_bytes(b"payload\n")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: _Files(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@needs_root
def test_inputs_belong_to_the_jobs_account(accounts, open_dir, daemons, served):
    """A root daemon stages a job's inputs (and the directories on their
    way) as its account's, so that the job reads and changes them."""
    daemon = daemons(open_dir, f"[executor]\nrun_as = {accounts.a}\n"
                     "[fetch]\nallow = 127.0.0.0/8\n")
    daemon.start()
    code, job = daemon.request("POST", "/v1/jobs", {
        "command": ["sh", "-c", "cat in/sub/data.txt && echo more >> in/sub/data.txt"],
        "inputs": [{"url": f"{served}/data.txt", "path": "in/sub/data.txt",
                    "sha256": hashlib.sha256(b"payload\n").hexdigest()}]})
    assert code == 201, job
    done = daemon.wait(job["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", (done, log_of(daemon, job["id"], "stderr"))
    assert log_of(daemon, job["id"]) == "payload\n"
    work = os.path.join(open_dir, "data", "jobs", job_path(job["id"]), "work")
    for path in ("in", "in/sub", "in/sub/data.txt"):
        assert os.stat(os.path.join(work, path)).st_uid == accounts.uid(accounts.a), path


@needs_root
def test_a_remote_worker_runs_each_owners_jobs_as_its_account(
        accounts, open_dir, daemons, token_file):
    """A worker running as root runs a job as its [executor] run_as, and a
    job of an owner its [run_as] names as that owner's account (the lease
    carries the owner); their logs reach the dispatcher."""
    daemon = daemons(open_dir, f"[executor]\nslots = 0\n[workers]\ntoken_file = {token_file}\n")
    daemon.start()
    code, made = daemon.request("POST", "/v1/credentials", {"name": "bob", "role": "submitter"})
    bob = made["token"]
    worker = WorkerProcess(
        pathlib.Path(open_dir), daemon.url, token_file, slots=2, name="w-runas",
        ini=f"[executor]\nrun_as = {accounts.a}\n[run_as]\nbob = {accounts.b}\n")
    worker.start()
    try:
        code, mine = daemon.request("POST", "/v1/jobs", {"command": ["id", "-u"]})
        code, bobs = daemon.request("POST", "/v1/jobs", {"command": ["id", "-u"]}, token=bob)
        for job in (mine, bobs):
            done = daemon.wait(job["id"], ("succeeded", "failed"), timeout=30)
            assert done["state"] == "succeeded", (done, worker.output())
        assert log_of(daemon, mine["id"]) == f"{accounts.uid(accounts.a)}\n"
        assert log_of(daemon, bobs["id"], token=bob) == f"{accounts.uid(accounts.b)}\n"
        # The worker keeps its directories as the daemon does.
        data = os.path.join(open_dir, "w-runas", "data")
        assert mode(data) == 0o711 and mode(os.path.join(data, "jobs")) == 0o711
        work = os.path.join(data, "jobs", job_path(bobs["id"]), "work")
        assert mode(work) == 0o700 and os.stat(work).st_uid == accounts.uid(accounts.b)
    finally:
        worker.kill()


# The spawner helper on its own.


class Helper:
    """The spawner helper as a bare subprocess, spoken to in JSON lines."""

    def __init__(self, directory, umask=0o022):
        self.directory = directory
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", _HELPER], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env={}, umask=umask)
        self.ids = iter(range(1, 1000))

    def spawn(self, argv, job="j", run_as=None):
        request = dict(
            op="spawn", id=next(self.ids), argv=argv, env={"PATH": "/usr/bin:/bin"},
            cwd=f"{self.directory}/jobs/aa/{job}/work",
            stdout=f"{self.directory}/jobs/aa/{job}/attempt-1/stdout",
            stderr=f"{self.directory}/jobs/aa/{job}/attempt-1/stderr")
        if run_as is not None:
            request["run_as"] = dict(user=run_as.user, uid=run_as.uid, gid=run_as.gid,
                                     groups=list(run_as.groups))
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        return self.replies(request["id"])

    def replies(self, job_id):
        """The helper's replies about job_id, up to its exit or its error."""
        got = []
        while True:
            line = self.process.stdout.readline()
            assert line, "the helper exited"
            reply = json.loads(line)
            if reply["id"] == job_id:
                got.append(reply)
                if reply["op"] in ("exited", "error"):
                    return got

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=10)


@needs_root
@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_the_helper_starts_a_job_as_its_account_and_takes_its_own_ids_back(
        open_dir, umask):
    """The helper starts a job with every id its account's and its groups,
    gives it its working directory and output files, makes the rest with
    their modes whatever its umask, and is root again afterwards."""
    helper = Helper(open_dir, umask)
    try:
        nobody = run_as("nobody")
        replies = helper.spawn(["cat", "/proc/self/status"], run_as=nobody)
        assert [r["op"] for r in replies] == ["spawned", "exited"], replies
        with open(f"{open_dir}/jobs/aa/j/attempt-1/stdout") as f:
            ids = status_ids(f.read())
        assert ids["Uid"] == [nobody.uid] * 4 and ids["Gid"] == [nobody.gid] * 4
        assert ids["Groups"] == set(nobody.groups)
        with open(f"/proc/{helper.process.pid}/status") as f:
            own = status_ids(f.read())
        assert own["Uid"] == [0] * 4 and own["Gid"] == [0] * 4
        assert mode(f"{open_dir}/jobs") == 0o711 and mode(f"{open_dir}/jobs/aa/j") == 0o711
        assert mode(f"{open_dir}/jobs/aa/j/attempt-1") == 0o700
        assert mode(f"{open_dir}/jobs/aa/j/attempt-1/stdout") == 0o600
        work = f"{open_dir}/jobs/aa/j/work"
        assert mode(work) == 0o700 and os.stat(work).st_uid == nobody.uid
    finally:
        helper.close()


@needs_root
def test_the_helper_says_what_the_jobs_account_may_not_do(open_dir):
    """A program the job's account may not execute, and an output file that
    is a symbolic link (which the helper never follows), are refused with
    words that say so, and nothing runs."""
    helper = Helper(open_dir)
    try:
        nobody = run_as("nobody")
        private = os.path.join(open_dir, "private")
        os.mkdir(private, 0o700)
        program = os.path.join(private, "prog")
        with open(program, "w") as f:
            f.write("#!/bin/sh\ntrue\n")
        os.chmod(program, 0o700)
        [reply] = helper.spawn([program], run_as=nobody)
        assert reply["error"] == (
            f"permission denied: {program} lies in {private}, which nobody may not enter")
        os.chmod(private, 0o711)
        [reply] = helper.spawn([program], run_as=nobody)
        assert reply["error"] == f"permission denied: {program} is not executable by nobody"
        os.makedirs(f"{open_dir}/jobs/aa/k/attempt-1")
        os.symlink("/etc/passwd", f"{open_dir}/jobs/aa/k/attempt-1/stdout")
        [reply] = helper.spawn(["true"], job="k", run_as=nobody)
        assert reply["error"] == (
            f"cannot open the stdout file {open_dir}/jobs/aa/k/attempt-1/stdout: "
            "it is a symbolic link")
        with open("/etc/passwd") as f:
            assert "root" in f.read()
    finally:
        helper.close()


def test_the_helper_ignores_the_signals_it_can(tmp_path):
    """The helper ignores every signal it may (so that a job of the account
    it momentarily takes cannot end it with one), and its jobs start with
    the default of each, none ignored or blocked."""
    helper = Helper(str(tmp_path))
    try:
        replies = helper.spawn(["sh", "-c", "grep -E '^Sig(Ign|Blk)' /proc/self/status"])
        assert replies[-1]["code"] == 0
        helper.process.send_signal(signal.SIGTERM)
        helper.process.send_signal(signal.SIGHUP)
        helper.process.send_signal(signal.SIGUSR1)
        time.sleep(0.2)
        assert alive(helper.process.pid)
        with open(f"{tmp_path}/jobs/aa/j/attempt-1/stdout") as f:
            lines = dict(line.split(":\t") for line in f.read().splitlines())
        # (glibc's posix_spawn leaves its own two, 32 and 33, ignored.)
        libc = (1 << 31) | (1 << 32)
        assert int(lines["SigIgn"], 16) & ~libc == 0 and int(lines["SigBlk"], 16) == 0
    finally:
        helper.close()


@pytest_twisted.ensureDeferred
async def test_a_daemon_told_an_account_it_cannot_use_does_not_start(tmp_path, monkeypatch):
    """A daemon not running as root whose run_as names another account
    refuses to start with one line saying which key and what to do, before
    it takes up anything."""
    import functools

    import dispatcher.execution._host as host

    # As a process of the account "daemon" would see it.
    monkeypatch.setattr(host, "job_accounts", functools.partial(
        job_accounts, euid=pwd.getpwnam("daemon").pw_uid, own_name=lambda uid: "daemon"))
    config = parse_config("[executor]\nrun_as = nobody\n", "t.ini")
    config = attrs.evolve(config, dispatcher=attrs.evolve(
        config.dispatcher, data_dir=str(tmp_path / "data")))
    service = DaemonService(reactor, config, serverFromString(reactor, "tcp:0:interface=127.0.0.1"),
                            stop_reactor=False)
    service.startService()
    with pytest.raises(CannotStart) as e:
        await service.ready
    assert str(e.value) == (
        "t.ini: [executor] run_as = 'nobody:nogroup': this process runs as daemon, not "
        "root, so its jobs can only run as daemon; remove the setting, or start it as root")
    assert not (tmp_path / "data").exists()
    await service.stopService()
