"""
Who may call the API (issue 15): credentials, roles, the first start's
admin token, authentication on the request's head, the token command, and
the audit of refusals.  Against a real twistd where the promise is the
daemon's, with real clients (curl as another account, raw sockets).
"""

import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from dispatcher.api._auth import AUDIT_BURST, AUDIT_WINDOW, Gate
from dispatcher.api._hosts import HostPolicy
from dispatcher.api._routes import Router
from dispatcher.model._principals import Principal, Role
from dispatcher.store._credentials import CredentialFile

from .test_twistd import BIN, ROOT, Twistd

ENV = dict(os.environ, PYTHONPATH=ROOT)


def token_command(*args):
    return subprocess.run([os.path.join(BIN, "dispatcher"), "token", *args], env=ENV,
                          capture_output=True, text=True, timeout=60)


def raw(daemon, data, read_until_close=True):
    """Send data on a new connection; what comes back (up to the close, or
    the first read)."""
    port = int(daemon.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close:
                break
        return b"".join(chunks)


@pytest.fixture
def daemon(tmp_path):
    daemon = Twistd(str(tmp_path), "[executor]\nslots = 0\n")
    daemon.start()
    yield daemon
    daemon.stop()


def test_a_first_start_makes_an_admin_token_and_requires_it_on_loopback(daemon, tmp_path):
    """A first start with no credential makes DATA_DIR/admin.token (0600),
    logs where it is, and requires a credential on loopback: a submit
    without one (or with a wrong one) is a 401 that stores nothing; the
    file's token is an admin's."""
    path = tmp_path / "data" / "admin.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with open(tmp_path / "out.log") as f:
        assert f"its token is in {path}" in f.read()
    credentials = json.loads((tmp_path / "data" / "credentials.json").read_text())
    assert daemon.token not in json.dumps(credentials)
    assert stat.S_IMODE((tmp_path / "data" / "credentials.json").stat().st_mode) == 0o600
    code, answer = daemon.request("POST", "/v1/jobs", {"command": ["id"]}, token="")
    assert (code, answer["error"]["code"]) == (401, "unauthorized")
    code, answer = daemon.request("POST", "/v1/jobs", {"command": ["id"]},
                                  token="dsp_not-a-token-of-this-dispatcher")
    assert code == 401
    code, me = daemon.request("GET", "/v1/me")
    assert code == 200 and me == {"name": "admin", "role": "admin", "worker_names": None}
    code, page = daemon.request("GET", "/v1/jobs")
    assert code == 200 and page["jobs"] == []


@pytest.mark.skipif(os.getuid() != 0, reason="running curl as nobody needs root "
                    "(CI runs as root)")
def test_another_local_account_cannot_submit(daemon):
    """Another local account (nobody), which cannot read the admin token,
    gets 401 for a submit through loopback, and nothing is stored."""
    assert shutil.which("curl"), "curl is needed (.ci/run installs it)"
    result = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", "-X", "POST",
         "-H", "Content-Type: application/json", "--data", '{"command": ["id"]}',
         daemon.url + "/v1/jobs"],
        capture_output=True, text=True, timeout=30, user="nobody")
    body, _, status = result.stdout.rpartition("\n")
    assert status == "401", result
    assert json.loads(body)["error"]["code"] == "unauthorized"
    code, page = daemon.request("GET", "/v1/jobs")
    assert code == 200 and page["jobs"] == []


def test_an_unknown_path_is_401_before_404(daemon):
    """Without a valid credential an unknown path is a 401, like a known
    one, so a stranger learns nothing of the routes; with one, it is 404."""
    for path in ("/v1/nothing-here", "/admin", "/v1/jobs/x/y/z"):
        code, answer = daemon.request("GET", path, token="")
        assert (code, answer["error"]["code"]) == (401, "unauthorized"), path
        code, answer = daemon.request("GET", path)
        assert (code, answer["error"]["code"]) == (404, "not_found"), path
    code, _ = daemon.request("GET", "/healthz", token="")
    assert code == 200


def test_no_100_continue_and_no_body_before_authentication(daemon):
    """A request that asks for 100 Continue without a credential is
    answered 401 on its head (the connection closes, its body is never
    read); with the admin token it is invited to send its body."""
    head = (b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1048000\r\n"
            b"Expect: 100-continue\r\n")
    answer = raw(daemon, head + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    assert b"100 Continue" not in answer
    assert b"Www-Authenticate: Bearer" in answer
    answer = raw(daemon, head + b"Authorization: Bearer %s\r\n\r\n" % daemon.token.encode(),
                 read_until_close=False)
    assert answer.startswith(b"HTTP/1.1 100 Continue"), answer
    # A stranger learns nothing from the body's size either: 401, not 413.
    answer = raw(daemon, b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 104857600\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401 "), answer


def test_the_token_command_makes_lists_and_revokes_while_the_daemon_runs(daemon, tmp_path):
    """dispatcher token create prints the new token alone on its last line
    and it works at once; the file keeps only its hash; ls lists it; a
    reader may read but not submit (403); revoke takes effect within a
    second, without a restart."""
    data = str(tmp_path / "data")
    made = token_command("create", "carol", "--role", "reader", "--data-dir", data)
    assert made.returncode == 0, made.stderr
    token = made.stdout.splitlines()[-1]
    assert token.startswith("dsp_") and len(token) >= 40
    assert token not in (tmp_path / "data" / "credentials.json").read_text()
    code, me = daemon.request("GET", "/v1/me", token=token)
    assert code == 200 and me["name"] == "carol" and me["role"] == "reader"
    code, page = daemon.request("GET", "/v1/jobs", token=token)
    assert code == 200
    code, answer = daemon.request("POST", "/v1/jobs", {"command": ["id"]}, token=token)
    assert (code, answer["error"]["code"]) == (403, "forbidden")
    listed = token_command("ls", "--config", daemon.config)
    assert listed.returncode == 0
    # The config names no data_dir; --data-dir is what the daemon got.
    listed = token_command("ls", "--data-dir", data)
    assert [line.split("\t")[:2] for line in listed.stdout.splitlines()] == [
        ["admin", "admin"], ["carol", "reader"]]
    taken = token_command("create", "carol", "--role", "admin", "--data-dir", data)
    assert taken.returncode == 1 and "exists" in taken.stderr
    bad = token_command("create", "../x", "--role", "admin", "--data-dir", data)
    assert bad.returncode == 1 and "invalid credential name" in bad.stderr
    bad = token_command("create", "dave", "--role", "root", "--data-dir", data)
    assert bad.returncode == 1 and "unknown role" in bad.stderr
    revoked = token_command("revoke", "carol", "--data-dir", data)
    assert revoked.returncode == 0, revoked.stderr
    # The daemon looks at the file once a second at most: refused within it.
    for _ in range(100):
        code, answer = daemon.request("GET", "/v1/jobs", token=token)
        if code != 200:
            break
        time.sleep(0.05)
    assert (code, answer["error"]["code"]) == (401, "unauthorized")
    again = token_command("revoke", "carol", "--data-dir", data)
    assert again.returncode == 1


def test_an_admin_makes_and_revokes_credentials_through_the_api(daemon):
    """POST /v1/credentials answers the token once (201), GET lists it
    without its token, DELETE revokes it at once (204, then 404); a
    submitter may not make credentials (403) and a worker credential lists
    only its names."""
    code, made = daemon.request("POST", "/v1/credentials",
                                {"name": "w1", "role": "worker",
                                 "worker_names": ["w1", "w1-b"]})
    assert code == 201, made
    assert made["worker_names"] == ["w1", "w1-b"] and made["token"].startswith("dsp_")
    code, listed = daemon.request("GET", "/v1/credentials")
    assert code == 200
    assert [c["name"] for c in listed["credentials"]] == ["admin", "w1"]
    assert all("token" not in c and "sha256" not in c for c in listed["credentials"])
    code, me = daemon.request("GET", "/v1/me", token=made["token"])
    assert me == {"name": "w1", "role": "worker", "worker_names": ["w1", "w1-b"]}
    code, answer = daemon.request("GET", "/v1/jobs", token=made["token"])
    assert code == 403
    code, sub = daemon.request("POST", "/v1/credentials", {"name": "s", "role": "submitter"})
    assert code == 201
    code, answer = daemon.request("POST", "/v1/credentials", {"name": "s2", "role": "admin"},
                                  token=sub["token"])
    assert (code, answer["error"]["code"]) == (403, "forbidden")
    code, answer = daemon.request("POST", "/v1/credentials",
                                  {"name": "s", "role": "reader"})
    assert (code, answer["error"]["field"]) == (409, "name")
    code, answer = daemon.request("POST", "/v1/credentials",
                                  {"name": "r", "role": "reader", "worker_names": ["x"]})
    assert (code, answer["error"]["field"]) == (400, "worker_names")
    code, answer = daemon.request("POST", "/v1/credentials", {"name": "a b", "role": "reader"})
    assert (code, answer["error"]["field"]) == (400, "name")
    code, _ = daemon.request("DELETE", "/v1/credentials/w1")
    assert code == 204
    code, answer = daemon.request("GET", "/v1/me", token=made["token"])
    assert code == 401
    code, answer = daemon.request("DELETE", "/v1/credentials/w1")
    assert code == 404


def test_a_percent_encoded_path_is_checked_as_the_route_it_reaches(daemon):
    """A path spelled with percent-escapes (/v1/%63redentials) reaches its
    route (an admin lists the credentials through it) and is checked as
    that route: a submitter cannot make itself an admin, a reader cannot
    submit, a worker cannot list jobs (403, nothing made), and no
    credential is a 401."""
    code, sub = daemon.request("POST", "/v1/credentials", {"name": "s", "role": "submitter"})
    code, reader = daemon.request("POST", "/v1/credentials", {"name": "r", "role": "reader"})
    code, worker = daemon.request("POST", "/v1/credentials", {"name": "w", "role": "worker"})
    code, listed = daemon.request("GET", "/v1/%63redentials")
    assert code == 200 and [c["name"] for c in listed["credentials"]] == ["admin", "s", "r", "w"]
    code, answer = daemon.request("POST", "/v1/%63redentials", {"name": "evil", "role": "admin"},
                                  token=sub["token"])
    assert (code, answer["error"]["code"]) == (403, "forbidden")
    code, answer = daemon.request("POST", "/v1/%6Aobs", {"command": ["id"]},
                                  token=reader["token"])
    assert (code, answer["error"]["code"]) == (403, "forbidden")
    code, answer = daemon.request("GET", "/v1/j%6Fbs", token=worker["token"])
    assert (code, answer["error"]["code"]) == (403, "forbidden")
    code, answer = daemon.request("DELETE", "/v1/%63redentials/admin", token="")
    assert (code, answer["error"]["code"]) == (401, "unauthorized")
    code, listed = daemon.request("GET", "/v1/credentials")
    assert [c["name"] for c in listed["credentials"]] == ["admin", "s", "r", "w"]
    code, page = daemon.request("GET", "/v1/jobs")
    assert page["jobs"] == []


def test_token_files_keep_working_as_an_admin_and_a_worker(tmp_path):
    """[api] token_file's token is an admin's and [workers] token_file's a
    worker's that may use any worker name; with an admin configured no
    admin.token is made."""
    (tmp_path / "api.token").write_text("api-token-0123456789abc\n")
    (tmp_path / "api.token").chmod(0o600)  # one others may read is refused
    (tmp_path / "w.token").write_text("worker-token-0123456789\n")
    (tmp_path / "w.token").chmod(0o600)  # one others may read is refused
    daemon = Twistd(str(tmp_path), f"[executor]\nslots = 0\n[api]\ntoken_file = "
                    f"{tmp_path / 'api.token'}\n[workers]\ntoken_file = {tmp_path / 'w.token'}\n")
    daemon.start()
    try:
        assert not (tmp_path / "data" / "admin.token").exists()
        code, me = daemon.request("GET", "/v1/me", token="api-token-0123456789abc")
        assert me == {"name": "api-token-file", "role": "admin", "worker_names": None}
        code, job = daemon.request("POST", "/v1/jobs", {"command": ["true"]},
                                   token="api-token-0123456789abc")
        assert code == 201
        code, me = daemon.request("GET", "/v1/me", token="worker-token-0123456789")
        assert me == {"name": "workers-token-file", "role": "worker", "worker_names": None}
        code, _ = daemon.request("POST", "/v1/jobs", {"command": ["true"]},
                                 token="worker-token-0123456789")
        assert code == 403
    finally:
        daemon.stop()


def test_refusals_are_logged_with_their_principal_and_rate_limited(tmp_path):
    """Each refusal is a warning naming the request and who made it, at
    most AUDIT_BURST lines a window; the rest are counted in one line when
    the next window opens."""
    clock = Clock()
    credentials = CredentialFile(str(tmp_path))
    token, _ = credentials.create("rita", Role.READER)
    gate = Gate(credentials, HostPolicy(), Router(), clock)
    events = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        for _ in range(AUDIT_BURST + 30):
            with pytest.raises(Exception):
                gate.check(b"POST", b"/v1/jobs", {b"host": b"127.0.0.1",
                                                  b"authorization": b"Bearer " + token.encode()},
                           client="10.0.0.9")
        clock.advance(AUDIT_WINDOW)
        with pytest.raises(Exception):
            gate.check(b"GET", b"/v1/jobs", {b"host": b"127.0.0.1"})
    finally:
        globalLogPublisher.removeObserver(observer)
    warnings = [e for e in events if e.get("log_level") == LogLevel.warn
                and e.get("log_namespace") == "dispatcher.api._auth"]
    refused = [e for e in warnings if "principal" in e]
    assert len(refused) == AUDIT_BURST + 1
    assert refused[0]["principal"] == "rita" and refused[0]["status"] == 403
    assert refused[0]["client"] == "10.0.0.9"
    assert refused[-1]["principal"] == "no credential" and refused[-1]["status"] == 401
    [summary] = [e for e in warnings if "count" in e]
    assert summary["count"] == 30


def test_a_credential_file_change_is_seen_at_the_next_check(tmp_path):
    """Two CredentialFile objects on one directory (the daemon's and the
    command's): a credential one makes authenticates through the other at
    once, and stops at once when revoked; a token is kept only as a hash."""
    daemon_side = CredentialFile(str(tmp_path))
    command_side = CredentialFile(str(tmp_path))
    assert daemon_side.authenticate(b"dsp_x") is None
    token, _ = command_side.create("w", Role.WORKER, ["w-1", "w-2"])
    principal = daemon_side.authenticate(token.encode())
    assert principal == Principal("w", Role.WORKER, frozenset({"w-1", "w-2"}))
    assert principal.may_act_as("w-2") and not principal.may_act_as("w")
    assert token not in (tmp_path / "credentials.json").read_text()
    command_side.revoke("w")
    assert daemon_side.authenticate(token.encode()) is None


def test_a_recheck_trusts_the_last_look_that_long_but_never_for_a_stranger(
    tmp_path, monkeypatch
):
    """With a recheck (the daemon's: 1 s), a credential the command revokes
    still passes until the recheck is over and is refused from the first
    check after; one revoked through the daemon's own object is refused at
    once; a token made by the command works at its first check; a token
    unknown costs a look each time, and one known none within the
    recheck."""
    clock = Clock()
    daemon_side = CredentialFile(str(tmp_path), recheck=1.0, now=clock.seconds)
    command_side = CredentialFile(str(tmp_path))
    assert daemon_side.authenticate(b"dsp_x") is None
    # Made by the other process: found at once, though the last look is fresh.
    token, _ = command_side.create("w", Role.WORKER)
    assert daemon_side.authenticate(token.encode()).name == "w"
    looks = []
    real_stat = os.stat

    def counted(path, *args, **kwargs):
        looks.append(path)
        return real_stat(path, *args, **kwargs)

    command_side.revoke("w")
    monkeypatch.setattr(os, "stat", counted)
    clock.advance(0.9)
    assert daemon_side.authenticate(token.encode()).name == "w"
    assert looks == []
    clock.advance(0.1)
    assert daemon_side.authenticate(token.encode()) is None
    assert len(looks) == 1
    assert daemon_side.authenticate(b"dsp_unknown") is None
    assert len(looks) == 2
    monkeypatch.undo()
    # Revoked through this very object: refused at the next check.
    other, _ = daemon_side.create("v", Role.READER)
    assert daemon_side.authenticate(other.encode()).name == "v"
    daemon_side.revoke("v")
    assert daemon_side.authenticate(other.encode()) is None
    assert daemon_side.named("v") is None
    made, _ = command_side.create("u", Role.READER)
    assert daemon_side.named("u").name == "u"


def test_a_remembered_token_is_forgotten_when_the_file_is_edited_in_place(tmp_path):
    """A token that matched (and is remembered, so as not to hash it on
    every request) stops matching at the next check once the credentials
    file is edited in place to drop it, without the rename the command
    makes."""
    credentials = CredentialFile(str(tmp_path))
    kept, _ = credentials.create("kept", Role.READER)
    dropped, _ = credentials.create("dropped", Role.SUBMITTER)
    for _ in range(2):
        assert credentials.authenticate(dropped.encode()).name == "dropped"
        assert credentials.authenticate(kept.encode()).name == "kept"
    path = tmp_path / "credentials.json"
    data = json.loads(path.read_text())
    data["credentials"] = [c for c in data["credentials"] if c["name"] != "dropped"]
    inode = path.stat().st_ino
    with open(path, "r+") as f:
        f.truncate(0)
        f.write(json.dumps(data))
    assert path.stat().st_ino == inode
    assert credentials.authenticate(dropped.encode()) is None
    assert credentials.authenticate(kept.encode()).name == "kept"


def unix_call(path, url_path, user=None, token=None):
    """curl over a UNIX socket, as user: (status, JSON answer), or None if
    it could not connect."""
    args = ["curl", "-s", "-w", "\n%{http_code}", "--unix-socket", path,
            "http://localhost" + url_path]
    if token:
        args += ["-H", f"Authorization: Bearer {token}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=30, user=user)
    if result.returncode == 7:
        return None
    body, _, status = result.stdout.rpartition("\n")
    return int(status), json.loads(body or "null")


@pytest.mark.skipif(os.getuid() != 0, reason="calling as another account needs root "
                    "(CI runs as root)")
def test_a_unix_socket_is_private_and_knows_its_callers(tmp_path):
    """A unix: listener is made 0600: root (and the daemon's account) is an
    admin without a token, another account cannot connect.  Made 0666 on
    purpose, another account is the credential of its name, and gets 401
    without one; SO_PEERCRED, not a header, says who it is."""
    assert shutil.which("curl"), "curl is needed (.ci/run installs it)"
    import tempfile

    # Where another account can reach it (pytest's tmp_path is root's alone).
    public = tempfile.mkdtemp(dir="/tmp")
    os.chmod(public, 0o755)
    sock = os.path.join(public, "api.sock")
    daemon = Twistd(str(tmp_path), "[executor]\nslots = 0\n", listen=f"unix:{sock}")
    _start_unix(daemon)
    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert unix_call(sock, "/v1/me") == (
            200, {"name": "root", "role": "admin", "worker_names": None})
        assert unix_call(sock, "/v1/me", user="nobody") is None
    finally:
        daemon.stop()
    daemon = Twistd(str(tmp_path), "[executor]\nslots = 0\n", listen=f"unix:{sock}:mode=666")
    _start_unix(daemon)
    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o666
        code, answer = unix_call(sock, "/v1/jobs", user="nobody")
        assert (code, answer["error"]["code"]) == (401, "unauthorized")
        made = token_command("create", "nobody", "--role", "submitter",
                             "--data-dir", str(tmp_path / "data"))
        assert made.returncode == 0
        assert unix_call(sock, "/v1/me", user="nobody") == (
            200, {"name": "nobody", "role": "submitter", "worker_names": None})
        code, answer = unix_call(sock, "/v1/credentials", user="nobody")
        assert code == 403
    finally:
        daemon.stop()
        shutil.rmtree(public, ignore_errors=True)


def _start_unix(daemon):
    """Start a Twistd on a unix: endpoint: it logs no TCP port, so wait for
    its listening line and the socket."""
    import re
    import time

    env = dict(os.environ, PYTHONPATH=ROOT)
    args = [os.path.join(BIN, "twistd"), "-n", "--pidfile", "", "dispatcher",
            "--config", daemon.config, "--listen", daemon.listen,
            "--data-dir", os.path.join(daemon.workdir, "data")]
    logpath = os.path.join(daemon.workdir, "out.log")
    offset = os.path.getsize(logpath) if os.path.exists(logpath) else 0
    daemon.log = open(logpath, "ab")
    daemon.process = subprocess.Popen(args, cwd=daemon.workdir, env=env, stdout=daemon.log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with open(logpath) as f:
            f.seek(offset)
            text = f.read()
        if re.search(r"dispatcher listening on", text):
            return
        if daemon.process.poll() is not None:
            raise AssertionError(f"twistd exited: {text}")
        time.sleep(0.05)
    raise AssertionError("twistd did not start listening")
