"""
The dashboard's cookie sessions over HTTP (dispatcher.api._dashboard and
the rules of dispatcher.api._auth): the cookie's attributes, over plain
HTTP and over TLS; a write that the cookie authenticates needs the
session's CSRF token; a bearer token is judged as before; logout, expiry,
revocation and the bounds; the pages' security headers.  Against a real
`twistd -n dispatcher` (and one on ssl:), with httpx; the sessions' clock
with a Clock.
"""

import ssl

import httpx
import pytest
from twisted.internet.task import Clock

from dispatcher.api._dashboard import (
    CONTENT_SECURITY_POLICY,
    MAX_SESSIONS,
    MAX_SESSIONS_PER_CREDENTIAL,
    SESSION_IDLE,
    SESSION_LIFETIME,
    Sessions,
    TooManySessions,
    session_id,
)
from dispatcher.model._principals import Principal, Role

from .test_tls import self_signed
from .test_twistd import ROOT, Twistd


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """A daemon that runs nothing itself (slots = 0): jobs stay queued."""
    workdir = tmp_path_factory.mktemp("sessions")
    daemon = Twistd(str(workdir), "[executor]\nslots = 0\n")
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture
def http(daemon):
    """A client of the daemon with no credential and its own cookie jar."""
    with httpx.Client(base_url=daemon.url, timeout=10) as client:
        yield client


JSON = {"Content-Type": "application/json"}


def log_in(http, token):
    """Log in; the answer, and the session's CSRF token."""
    answer = http.post("/ui/session", json={"token": token})
    assert answer.status_code == 200, answer.text
    return answer, answer.json()["csrf_token"]


def jobs_of(daemon):
    code, page = daemon.request("GET", "/v1/jobs?limit=1000")
    assert code == 200
    return {j["id"] for j in page["jobs"]}


def test_the_page_and_its_files_need_no_credential_and_carry_the_security_headers(http):
    """/ui/ and its files are served to anyone (they hold no data), with a
    CSP that allows no inline script, framing refused and nosniff; a file
    that is not one of them is a 404, a path outside them too."""
    for path, kind in (("/ui/", "text/html"), ("/ui", "text/html"),
                       ("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")):
        answer = http.get(path)
        assert answer.status_code == 200, path
        assert answer.headers["content-type"].startswith(kind)
        assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "script-src 'self'" in CONTENT_SECURITY_POLICY
        assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
        assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in http.get("/ui/").text
    missing = http.get("/ui/nothing.js")
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "file"
    assert http.get("/ui/..%2Fdispatcher.ini").status_code == 404
    assert http.get("/ui/%2E%2E").status_code == 404


def test_a_login_sets_a_strict_httponly_cookie_that_is_not_the_token(http, daemon):
    """The login's answer sets the session cookie HttpOnly, SameSite=Strict,
    Path=/, without Secure on plain HTTP; its value is a random id, not the
    token; the answer gives the CSRF token and is not to be cached."""
    answer, csrf = log_in(http, daemon.token)
    cookie = answer.headers["set-cookie"]
    name, _, rest = cookie.partition("=")
    value, *attributes = [part.strip() for part in rest.split(";")]
    assert name == "dispatcher-session"
    assert value and daemon.token not in cookie and value != csrf
    assert set(attributes) >= {"HttpOnly", "SameSite=Strict", "Path=/"}
    assert "Secure" not in attributes and not any(a.startswith("Domain") for a in attributes)
    assert answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert (body["name"], body["role"], body["authentication"]) == ("admin", "admin", True)
    assert len(csrf) >= 40
    # GET /ui/session with the cookie alone: the same session.
    again = http.get("/ui/session")
    assert again.status_code == 200 and again.json()["csrf_token"] == csrf


def test_a_bad_token_makes_no_session(http):
    """A login with a token the dispatcher does not know is a 401 naming
    the token, and sets no cookie; one that is not a string is a 400."""
    answer = http.post("/ui/session", json={"token": "dsp_wrong"})
    assert answer.status_code == 401 and answer.json()["error"]["field"] == "token"
    assert "set-cookie" not in answer.headers
    assert http.post("/ui/session", json={"token": 5}).status_code == 400
    assert http.post("/ui/session", json={}).status_code == 400
    # Like every POST: JSON, or no form could be told apart.
    assert http.post("/ui/session", content=b"token=x",
                     headers={"Content-Type": "application/x-www-form-urlencoded"}
                     ).status_code == 415
    assert http.get("/ui/session").status_code == 401


def test_the_cookie_reads_the_api(http, daemon):
    """With the cookie alone the API answers its GETs as to the credential
    that logged in."""
    log_in(http, daemon.token)
    assert http.get("/v1/me").json()["name"] == "admin"
    assert http.get("/v1/jobs").status_code == 200
    with http.stream("GET", "/v1/events") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")


def test_a_write_with_the_cookie_needs_the_csrf_token(http, daemon):
    """A POST or DELETE the cookie authenticates is refused 403 without the
    session's CSRF token or with another, and changes nothing; with it, it
    is done."""
    _, csrf = log_in(http, daemon.token)
    before = jobs_of(daemon)
    for headers in (JSON, {**JSON, "X-CSRF-Token": "x" * len(csrf)},
                    {**JSON, "X-CSRF-Token": ""}):
        refused = http.post("/v1/jobs", json={"command": ["true"]}, headers=headers)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "csrf_failed"
        assert refused.json()["error"]["field"] == "X-CSRF-Token"
    assert jobs_of(daemon) == before
    made = http.post("/v1/jobs", json={"command": ["true"]},
                     headers={**JSON, "X-CSRF-Token": csrf})
    assert made.status_code == 201, made.text
    job_id = made.json()["id"]
    refused = http.post(f"/v1/jobs/{job_id}/cancel", headers=JSON)
    assert refused.status_code == 403
    code, job = daemon.request("GET", f"/v1/jobs/{job_id}")
    assert job["state"] == "queued"
    done = http.post(f"/v1/jobs/{job_id}/cancel", headers={**JSON, "X-CSRF-Token": csrf})
    assert done.status_code == 200 and done.json()["state"] == "cancelled"
    refused = http.delete(f"/v1/jobs/{job_id}")
    assert refused.status_code == 403 and job_id in jobs_of(daemon)
    assert http.delete(f"/v1/jobs/{job_id}", headers={"X-CSRF-Token": csrf}).status_code == 204
    # An unknown path, written with the cookie: refused the same.
    assert http.post("/v1/nothing", headers=JSON).status_code == 403


def test_another_sessions_csrf_token_does_not_do(daemon):
    """A CSRF token is its own session's: one browser's token does not
    authorize another's cookie."""
    with httpx.Client(base_url=daemon.url) as one, httpx.Client(base_url=daemon.url) as two:
        _, csrf_one = log_in(one, daemon.token)
        _, csrf_two = log_in(two, daemon.token)
        assert csrf_one != csrf_two
        refused = two.post("/v1/jobs", json={"command": ["true"]},
                           headers={**JSON, "X-CSRF-Token": csrf_one})
        assert refused.status_code == 403


def test_a_bearer_token_is_judged_alone(http, daemon):
    """A request with a bearer token needs no CSRF token, whatever cookie it
    carries, and a bad bearer token is not rescued by a good cookie."""
    log_in(http, daemon.token)
    made = http.post("/v1/jobs", json={"command": ["true"]},
                     headers={**JSON, "Authorization": f"Bearer {daemon.token}"})
    assert made.status_code == 201
    refused = http.get("/v1/jobs", headers={"Authorization": "Bearer dsp_wrong"})
    assert refused.status_code == 401
    answer = http.get("/ui/session", headers={"Authorization": f"Bearer {daemon.token}"})
    assert answer.json()["csrf_token"] is None


def test_another_origin_is_refused_even_with_the_cookie_and_token(http, daemon):
    """A request whose Origin is another site is refused before its cookie
    counts (the Host and Origin rules of the API)."""
    _, csrf = log_in(http, daemon.token)
    refused = http.post("/v1/jobs", json={"command": ["true"]},
                        headers={**JSON, "X-CSRF-Token": csrf, "Origin": "https://evil.example"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden_origin"
    same = http.post("/v1/jobs", json={"command": ["true"]},
                     headers={**JSON, "X-CSRF-Token": csrf, "Origin": daemon.url})
    assert same.status_code == 201


def test_logout_needs_the_csrf_token_and_clears_the_cookie(http, daemon):
    """Logout without the CSRF token is refused (a page elsewhere cannot log
    the user out); with it, the answer clears the cookie and the session's
    id opens nothing any more."""
    _, csrf = log_in(http, daemon.token)
    kept = dict(http.cookies)
    assert http.delete("/ui/session").status_code == 403
    assert http.get("/v1/me").status_code == 200
    answer = http.delete("/ui/session", headers={"X-CSRF-Token": csrf})
    assert answer.status_code == 204
    cleared = answer.headers["set-cookie"]
    assert cleared.startswith("dispatcher-session=;") and "Max-Age=0" in cleared
    assert "HttpOnly" in cleared and "SameSite=Strict" in cleared and "Path=/" in cleared
    assert http.get("/v1/me").status_code == 401
    with httpx.Client(base_url=daemon.url, cookies=kept) as stale:
        assert stale.get("/v1/me").status_code == 401


def test_a_login_replaces_the_session_the_browser_had(http, daemon):
    """Logging in again ends the session whose cookie came with the login
    (an id another page fixed for the browser does not survive it)."""
    log_in(http, daemon.token)
    first = dict(http.cookies)
    log_in(http, daemon.token)
    assert dict(http.cookies) != first
    with httpx.Client(base_url=daemon.url, cookies=first) as old:
        assert old.get("/v1/me").status_code == 401


def test_a_revoked_credentials_sessions_end(http, daemon):
    """A session opened with a credential is refused from the request after
    the credential's revocation."""
    code, made = daemon.request("POST", "/v1/credentials", {"name": "ui-reader", "role": "reader"})
    assert code == 201, made
    log_in(http, made["token"])
    assert http.get("/v1/me").json() == {"name": "ui-reader", "role": "reader",
                                         "worker_names": None}
    # A reader's session may read, not write, CSRF token or not.
    csrf = http.get("/ui/session").json()["csrf_token"]
    refused = http.post("/v1/jobs", json={"command": ["true"]},
                        headers={**JSON, "X-CSRF-Token": csrf})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    code, _ = daemon.request("DELETE", "/v1/credentials/ui-reader")
    assert code == 204
    assert http.get("/v1/me").status_code == 401


def test_over_tls_the_cookie_is_secure_with_the_host_prefix(tmp_path):
    """Over TLS the cookie is Secure and named __Host-dispatcher-session;
    the same id under the plain name (which another host of the domain
    could have set) opens nothing."""
    key, cert = self_signed(str(tmp_path))
    daemon = Twistd(str(tmp_path), "[executor]\nslots = 0\n",
                    listen=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    daemon.start()
    try:
        url = daemon.url.replace("http://", "https://")
        trust = ssl.create_default_context(cafile=cert)
        with httpx.Client(base_url=url, verify=trust) as client:
            answer = client.post("/ui/session", json={"token": daemon.token})
            assert answer.status_code == 200, answer.text
            cookie = answer.headers["set-cookie"]
            assert cookie.startswith("__Host-dispatcher-session=")
            assert "; Secure" in cookie and "Path=/" in cookie and "Domain" not in cookie
            value = cookie.split(";")[0].split("=", 1)[1]
        with httpx.Client(base_url=url, verify=trust,
                          cookies={"__Host-dispatcher-session": value}) as prefixed:
            assert prefixed.get("/v1/me").status_code == 200
        with httpx.Client(base_url=url, verify=trust,
                          cookies={"dispatcher-session": value}) as plain:
            assert plain.get("/v1/me").status_code == 401
    finally:
        daemon.stop()


# The sessions themselves, on a Clock.

ALICE = Principal("alice", Role.SUBMITTER)


def test_a_session_ends_after_its_idle_time_and_its_lifetime():
    """A session unused for its idle time is gone; one in use is kept until
    its lifetime, then gone however much it is used."""
    clock = Clock()
    sessions = Sessions(clock, idle=10, lifetime=25)
    idle = sessions.open(b"t", ALICE)
    used = sessions.open(b"t", ALICE)
    for _ in range(4):
        clock.advance(6)
        assert sessions.find(used.id) is used
    assert sessions.find(idle.id) is None
    clock.advance(1)
    assert sessions.find(used.id) is None and len(sessions) == 0


def test_the_sessions_are_bounded():
    """A credential keeps at most its number of sessions (its least recently
    used ends for a new one); the dispatcher at most its number in all, and
    a login past it is refused until one expires."""
    clock = Clock()
    sessions = Sessions(clock, idle=100, lifetime=1000, max_sessions=3, per_credential=2)
    a1 = sessions.open(b"a", ALICE)
    clock.advance(1)
    a2 = sessions.open(b"a", ALICE)
    clock.advance(1)
    sessions.find(a1.id)
    a3 = sessions.open(b"a", ALICE)
    assert sessions.find(a2.id) is None
    assert sessions.find(a1.id) is a1 and sessions.find(a3.id) is a3
    sessions.open(b"b", Principal("bob", Role.READER))
    with pytest.raises(TooManySessions):
        sessions.open(b"c", Principal("carol", Role.READER))
    clock.advance(100)
    assert sessions.open(b"c", Principal("carol", Role.READER)).name == "carol"
    assert len(sessions) == 1


def test_the_cookie_is_read_under_its_connections_name_alone():
    """The session id is read from the Cookie header under the plain name
    on plain HTTP and under the __Host- name over TLS, never the other."""
    header = b"other=1; dispatcher-session=abc; __Host-dispatcher-session=def"
    assert session_id(header, False) == "abc"
    assert session_id(header, True) == "def"
    assert session_id(b"dispatcher-session=abc", True) is None
    assert session_id(b"dispatcher-session=" + b"x" * 65, False) is None
    assert session_id(None, False) is None


def test_the_docs_give_the_sessions_bounds_the_code_has():
    """README and docs/security.md state the sessions' idle time, lifetime
    and bounds as the constants are."""
    for name in ("README.md", "docs/security.md"):
        with open(f"{ROOT}/{name}") as f:
            text = " ".join(f.read().split())
        assert f"{SESSION_IDLE / 3600:g} hours unused" in text, name
        assert f"{SESSION_LIFETIME / 3600:g} hours after its login" in text, name
        assert f"{MAX_SESSIONS:,}" in text and f"{MAX_SESSIONS_PER_CREDENTIAL} " in text, name


def test_the_wheel_ships_the_dashboards_files(tmp_path):
    """A wheel built from the checkout holds every file of the dashboard
    (package data): an installed daemon serves /ui/ with no build step."""
    import os
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
         "-w", str(tmp_path), ROOT],
        check=True, capture_output=True, timeout=300)
    [wheel] = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("dispatcher/api/dashboard/")}
    assert shipped == set(os.listdir(f"{ROOT}/dispatcher/api/dashboard"))
    assert {"index.html", "app.js", "style.css"} <= shipped


def test_with_authentication_off_the_dashboard_needs_no_login(tmp_path):
    """With [api] authentication = off, GET /ui/session answers the local
    admin without a session (no CSRF token: there is no cookie to guard),
    so the page opens without a login."""
    daemon = Twistd(str(tmp_path), "[executor]\nslots = 0\n\n[api]\nauthentication = off\n")
    daemon.start()
    try:
        with httpx.Client(base_url=daemon.url) as client:
            answer = client.get("/ui/session")
            assert answer.status_code == 200
            assert answer.json() == {"name": "local", "role": "admin", "csrf_token": None,
                                     "expires_at": None, "authentication": False}
    finally:
        daemon.stop()
