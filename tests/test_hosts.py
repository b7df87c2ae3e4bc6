"""
Host and Origin (issue 15): DNS rebinding and cross-site forms are
refused, by a real twistd, while curl, the worker and the user's own
browser pages pass; and [server] allowed_hosts is read strictly.
"""

import http.client
import json
import os
import subprocess

import pytest

from dispatcher.api._hosts import HostPolicy
from dispatcher.config._ini import ConfigError, host_list, parse_config
from dispatcher.wire._submission import ApiError

from .test_twistd import BIN, Twistd


class Headers:
    """The part of a request that HostPolicy reads."""

    def __init__(self, **headers):
        self.requestHeaders = {k.lower().encode(): v.encode() for k, v in headers.items()}


def refusal(policy, **headers):
    """The (status, code) that policy answers these headers, or None."""
    try:
        policy.check(Headers(**headers))
    except ApiError as e:
        return e.status, e.code
    return None


# [server] allowed_hosts


def test_allowed_hosts_are_read_comma_or_space_separated():
    """Names with or without a port, [IPv6] addresses, commas or spaces or
    both, are read lower-cased and once each; * alone is any Host; an
    empty value is the default."""
    config = parse_config(
        "[server]\nallowed_hosts = Dispatcher.example, 10.0.0.5:8080 [::1]:80\n"
        "  build-01.lan,dispatcher.example\n"
    )
    assert config.server.allowed_hosts == (
        "dispatcher.example", "10.0.0.5:8080", "[::1]:80", "build-01.lan"
    )
    assert host_list("*") == ("*",)
    assert host_list("  ") is None
    assert parse_config("").server.allowed_hosts is None


@pytest.mark.parametrize("value", [
    "http://dispatcher.example", "::1", "host:0", "host:65536", "host:", "under_score",
    "-dash.example", "*, dispatcher.example", "dispatcher.example/v1",
])
def test_a_bad_allowed_hosts_stops_startup_with_one_line(value):
    """An entry that is not a host name, IPv4 or [IPv6] address with an
    optional port from 1 to 65535 (a URL, a bare IPv6 address, * among
    names) is a configuration error of one line naming file, section, key
    and value."""
    with pytest.raises(ConfigError) as e:
        parse_config(f"[server]\nallowed_hosts = {value}\n", "d.ini")
    message = str(e.value)
    assert message.startswith(f"d.ini: [server] allowed_hosts = {value!r}: ")
    assert "\n" not in message


def test_a_bad_allowed_hosts_stops_twistd(tmp_path):
    """twistd refuses to start with a bad allowed_hosts, in one line."""
    config = tmp_path / "bad.ini"
    config.write_text("[server]\nallowed_hosts = http://dispatcher.example\n")
    result = subprocess.run(
        [os.path.join(BIN, "twistd"), "-n", "--pidfile", "", "dispatcher",
         "--config", str(config)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert f"{config}: [server] allowed_hosts = 'http://dispatcher.example': " in output
    assert "Traceback" not in output
    assert not (tmp_path / "var").exists()


# The policy


def test_loopback_names_at_any_port_and_the_listen_address_are_answered():
    """By default the loopback names at any port (and alone) and the bound
    address and port are answered; another name, another address, or the
    bound address at another port is invalid_host."""
    policy = HostPolicy()
    policy.listening_on("10.0.0.5", 8080)
    for host in ("localhost", "LocalHost:9", "127.0.0.1:8080", "[::1]:1234", "[::1]",
                 "10.0.0.5:8080"):
        assert refusal(policy, Host=host) is None, host
    for host in ("attacker.example", "attacker.example:8080", "10.0.0.5:8081",
                 "10.0.0.6:8080", "localhost.attacker.example", "localhost:x",
                 "127.0.0.1.nip.io:8080", "[::1", "",
                 # Hostile: control bytes, a user part, a huge port or name,
                 # a name beyond ASCII, a trailing dot, a path.
                 "localhost\x00", "localhost\r\nX: y", "evil@localhost",
                 "localhost:99999999999999999999", "localhost:-1", "a" * 100_000,
                 "l\u00f3calhost", "localhost.", "localhost/x"):
        assert refusal(policy, Host=host) == (400, "invalid_host"), host[:50]


def test_every_interface_answers_any_address_but_no_other_name():
    """Listening on every interface, any IP address at any port is answered
    (a rebinding page can only send a name), a name is not."""
    policy = HostPolicy()
    policy.listening_on("0.0.0.0", 8080)
    for host in ("192.168.1.7:8080", "203.0.113.9:9000", "[2001:db8::1]:8080", "localhost:1"):
        assert refusal(policy, Host=host) is None, host
    assert refusal(policy, Host="attacker.example:8080") == (400, "invalid_host")


def test_configured_names_with_and_without_port():
    """A configured name without a port is answered at any port; with one,
    at that port alone; * answers any Host."""
    policy = HostPolicy(("dispatcher.example", "build.lan:8443"))
    policy.listening_on("127.0.0.1", 8080)
    for host in ("dispatcher.example", "Dispatcher.Example:8080", "build.lan:8443"):
        assert refusal(policy, Host=host) is None, host
    for host in ("build.lan", "build.lan:8080", "other.example"):
        assert refusal(policy, Host=host) == (400, "invalid_host"), host
    assert refusal(HostPolicy(("*",)), Host="anything.example") is None


def test_origins():
    """No Origin passes; an Origin whose host is the request's Host or an
    allowed name passes; another site's, null, or one that is not a URL is
    forbidden_origin, with any Host allowed too."""
    policy = HostPolicy(("dispatcher.example",))
    policy.listening_on("0.0.0.0", 8080)
    host = "192.168.1.7:8080"
    for origin in ("http://192.168.1.7:8080", "http://localhost:3000",
                   "https://dispatcher.example", "http://127.0.0.1"):
        assert refusal(policy, Host=host, Origin=origin) is None, origin
    assert refusal(policy, Host=host) is None
    for origin in ("http://attacker.example", "http://192.168.1.8:8080", "null",
                   "192.168.1.7:8080", "file://", "http://"):
        assert refusal(policy, Host=host, Origin=origin) == (403, "forbidden_origin"), origin
    anything = HostPolicy(("*",))
    assert refusal(anything, Host="a.example", Origin="http://a.example") is None
    assert refusal(anything, Host="a.example", Origin="http://b.example") == (
        403, "forbidden_origin")


# A real twistd


def call(daemon, method, path, body=None, **headers):
    """A request with exactly these headers (Host given or not) and the
    daemon's admin token; the status and the decoded JSON answer."""
    port = int(daemon.url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {k.replace("_", "-"): v for k, v in headers.items()}
        headers.setdefault("Authorization", f"Bearer {daemon.token}")
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


@pytest.fixture
def daemon(tmp_path):
    # No slots: a submitted job stays queued, so a cancel can be tried.
    daemon = Twistd(str(tmp_path), "[executor]\nslots = 0\n"
                    "[server]\nallowed_hosts = dispatcher.example\n")
    daemon.start()
    yield daemon
    daemon.stop()


JSON = "application/json"


def test_dns_rebinding_and_cross_site_requests_are_refused(daemon):
    """Against a real twistd: a submit with Host: attacker.example is 400
    invalid_host and stores nothing (and /healthz, which a rebinding page
    could read, is refused too); an Origin of another site is 403; a
    cross-site form's text/plain POST to cancel, or one without
    Content-Type, is 415 and the job stays queued; a curl-like client, the
    user's page on localhost and a configured name are answered."""
    port = daemon.url.rsplit(":", 1)[1]
    job = {"command": ["true"]}

    code, answer = call(daemon, "POST", "/v1/jobs", job,
                        Host="attacker.example", Content_Type=JSON)
    assert code == 400
    assert answer["error"]["code"] == "invalid_host"
    assert answer["error"]["field"] == "Host"
    code, answer = call(daemon, "GET", "/healthz", Host=f"attacker.example:{port}")
    assert (code, answer["error"]["code"]) == (400, "invalid_host")
    code, answer = call(daemon, "POST", "/v1/jobs", job, Host=f"127.0.0.1:{port}",
                        Origin="http://attacker.example", Content_Type=JSON)
    assert code == 403
    assert answer["error"]["code"] == "forbidden_origin"
    assert answer["error"]["field"] == "Origin"
    code, answer = call(daemon, "POST", "/v1/jobs", job, Host=f"127.0.0.1:{port}",
                        Origin="null", Content_Type=JSON)
    assert (code, answer["error"]["code"]) == (403, "forbidden_origin")
    code, page = call(daemon, "GET", "/v1/jobs", Host=f"127.0.0.1:{port}")
    assert code == 200 and page["jobs"] == []

    # Allowed: curl's Host and no Origin; the user's page on localhost; a
    # configured name.
    code, queued = call(daemon, "POST", "/v1/jobs", job, Host=f"127.0.0.1:{port}",
                        Content_Type=JSON)
    assert code == 201
    code, _ = call(daemon, "POST", "/v1/jobs", job, Host=f"localhost:{port}",
                   Origin=f"http://localhost:{port}", Content_Type=JSON)
    assert code == 201
    code, _ = call(daemon, "GET", "/healthz", Host="dispatcher.example")
    assert code == 200

    cancel = f"/v1/jobs/{queued['id']}/cancel"
    for headers in ({"Content_Type": "text/plain"}, {},
                    {"Content_Type": "application/x-www-form-urlencoded"}):
        code, answer = call(daemon, "POST", cancel, None,
                            Host=f"127.0.0.1:{port}", **headers)
        assert code == 415, headers
        assert answer["error"]["code"] == "unsupported_media_type"
    code, job_now = call(daemon, "GET", f"/v1/jobs/{queued['id']}", Host=f"127.0.0.1:{port}")
    assert job_now["state"] == "queued"
    code, job_now = call(daemon, "POST", cancel, Host=f"127.0.0.1:{port}", Content_Type=JSON)
    assert code == 200
    assert job_now["state"] == "cancelled"
