"""
Quotas per owner, against a real daemon with real credentials: the most
unfinished jobs an owner may have, and how fast it may submit.  Over
either a request is answered 429 with Retry-After, and nothing of it is
stored; admins are not limited unless a section says so.
"""

import json

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import Clock

from dispatcher.api._openapi import openapi_document
from dispatcher.config._ini import (
    DEFAULT_QUOTA,
    OWNER_NAME,
    ROLE_NAMES,
    ConfigError,
    QuotaLimits,
    parse_config,
)
from dispatcher.model._principals import PRINCIPAL_NAME_PATTERN, Role
from dispatcher.api._quotas import UNFINISHED_RETRY_AFTER

from .test_owners import call, with_credentials


async def quota_daemon(make_daemon, quota, clock=None, data_dir=None):
    """A daemon that runs nothing, with the quota sections C{quota} and the
    credentials of test_owners (ann and bob, submitters; rita, a reader)."""
    return await with_credentials(
        await make_daemon("[executor]\nslots = 0\n" + quota, clock=clock, data_dir=data_dir))


async def jobs_of(daemon, owner):
    code, page = await call(daemon, "admin", "GET", f"/v1/jobs?owner={owner}")
    assert code == 200, page
    return page["jobs"]


async def refused(daemon, who, path, body, code, field):
    """Send C{body} as C{who} and check it is a 429 of C{code} naming
    C{field}, with Retry-After; the error's retry_after, which agrees."""
    response, content = await daemon.request(
        "POST", path, body, headers={"Authorization": [f"Bearer {daemon.tokens[who]}"]})
    answer = json.loads(content)
    assert response.code == 429, answer
    assert answer["error"]["code"] == code
    assert answer["error"]["field"] == field
    (retry_after,) = response.headers.getRawHeaders("retry-after")
    assert int(retry_after) == answer["error"]["retry_after"] >= 1
    return answer["error"]


@pytest_twisted.ensureDeferred
async def test_more_unfinished_jobs_than_max_jobs_are_refused_whole(make_daemon):
    """
    A request that would give its owner more unfinished jobs than max_jobs
    is a 429 too_many_jobs naming what made the jobs (a batch's jobs, an
    array, one job's body), and stores none of them; once a job finishes
    there is room again.
    """
    daemon = await quota_daemon(make_daemon, "[quota:owner=ann]\nmax_jobs = 3\n")
    error = await refused(daemon, "ann", "/v1/jobs/batch",
                          {"jobs": [{"command": ["true"]}] * 4}, "too_many_jobs", "jobs")
    assert error["retry_after"] == UNFINISHED_RETRY_AFTER
    assert "limit of 3" in error["message"] and "max_jobs" in error["message"]
    await refused(daemon, "ann", "/v1/jobs", {"command": ["true"], "array": 4},
                  "too_many_jobs", "array")
    assert await jobs_of(daemon, "ann") == []
    made = []
    for _ in range(3):
        code, job = await call(daemon, "ann", "POST", "/v1/jobs", {"command": ["true"]})
        assert code == 201, job
        made.append(job["id"])
    await refused(daemon, "ann", "/v1/jobs", {"command": ["true"]}, "too_many_jobs", "body")
    assert len(await jobs_of(daemon, "ann")) == 3
    # Another submitter has its own count.
    code, job = await call(daemon, "bob", "POST", "/v1/jobs/batch",
                           {"jobs": [{"command": ["true"]}] * 4})
    assert code == 201, job
    code, job = await call(daemon, "ann", "POST", f"/v1/jobs/{made[0]}/cancel")
    assert code == 200, job
    code, job = await call(daemon, "ann", "POST", "/v1/jobs", {"command": ["true"]})
    assert code == 201, job


@pytest_twisted.ensureDeferred
async def test_the_count_holds_under_concurrent_submissions(make_daemon):
    """
    Of twenty submissions one owner sends at once, exactly max_jobs are
    stored and the others answered 429.
    """
    daemon = await quota_daemon(make_daemon, "[quota:owner=ann]\nmax_jobs = 5\n")

    async def one(i):
        body = {"command": ["true"]} if i % 2 else {"jobs": [{"command": ["true"]}]}
        path = "/v1/jobs" if i % 2 else "/v1/jobs/batch"
        code, _ = await call(daemon, "ann", "POST", path, body)
        return code

    codes = await gatherResults([ensureDeferred(one(i)) for i in range(20)])
    assert sorted(codes) == [201] * 5 + [429] * 15
    assert len(await jobs_of(daemon, "ann")) == 5


@pytest_twisted.ensureDeferred
async def test_a_submission_faster_than_the_rate_waits(make_daemon):
    """
    An owner may submit a burst at once, then rate jobs a second: a request
    past it is a 429 too_many_submissions whose Retry-After is when enough
    will have come back, and stores nothing.  A request larger than the
    burst is taken when the bucket is full and paid back over time.
    """
    clock = Clock()
    clock.advance(1_000_000)
    daemon = await quota_daemon(
        make_daemon, "[quota:role=submitter]\nrate = 2\nburst = 4\n", clock=clock)
    code, made = await call(daemon, "bob", "POST", "/v1/jobs/batch",
                            {"jobs": [{"command": ["true"]}] * 4})
    assert code == 201, made
    error = await refused(daemon, "bob", "/v1/jobs", {"command": ["true"]},
                          "too_many_submissions", "body")
    assert error["retry_after"] == 1
    assert "2 jobs a second, 4 at once" in error["message"]
    assert len(await jobs_of(daemon, "bob")) == 4
    clock.advance(0.5)
    code, job = await call(daemon, "bob", "POST", "/v1/jobs", {"command": ["true"]})
    assert code == 201, job
    # Full again after two seconds: six at once go in, and the next waits
    # for what they took beyond the burst (three seconds at two a second).
    clock.advance(2)
    code, job = await call(daemon, "bob", "POST", "/v1/jobs",
                           {"command": ["true"], "array": 6})
    assert code == 201, job
    error = await refused(daemon, "bob", "/v1/jobs", {"command": ["true"]},
                          "too_many_submissions", "body")
    assert error["retry_after"] == 2
    # Each owner has its own bucket; an admin has none.
    code, job = await call(daemon, "ann", "POST", "/v1/jobs", {"command": ["true"]})
    assert code == 201, job
    code, made = await call(daemon, "admin", "POST", "/v1/jobs/batch",
                            {"jobs": [{"command": ["true"]}] * 20})
    assert code == 201, made


@pytest_twisted.ensureDeferred
async def test_a_refused_request_gives_back_its_share_of_the_rate(make_daemon):
    """
    A request the count refuses takes nothing of its owner's rate: after
    it, the owner may still submit what the rate allowed.
    """
    clock = Clock()
    clock.advance(1_000_000)
    daemon = await quota_daemon(
        make_daemon, "[quota:owner=ann]\nmax_jobs = 2\nrate = 1\nburst = 3\n", clock=clock)
    code, made = await call(daemon, "ann", "POST", "/v1/jobs/batch",
                            {"jobs": [{"command": ["true"]}] * 2})
    assert code == 201, made
    await refused(daemon, "ann", "/v1/jobs", {"command": ["true"]}, "too_many_jobs", "body")
    code, job = await call(daemon, "ann", "POST", f"/v1/jobs/{made['jobs'][0]['id']}/cancel")
    assert code == 200, job
    code, job = await call(daemon, "ann", "POST", "/v1/jobs", {"command": ["true"]})
    assert code == 201, job


@pytest_twisted.ensureDeferred
async def test_a_replay_is_answered_whatever_the_rate(make_daemon):
    """
    A request sent again with its Idempotency-Key (its client lost the
    answer) is answered with the jobs it made, 200, even when its owner's
    rate has run out since: it stores nothing.  A 429 saying "nothing was
    stored" would have its client submit again, under a new key, and make
    the jobs twice.  A new key past the rate is still refused, and storing
    nothing.
    """
    clock = Clock()
    clock.advance(1_000_000)
    daemon = await quota_daemon(
        make_daemon, "[quota:owner=ann]\nrate = 1\nburst = 2\n", clock=clock)
    key = {"Idempotency-Key": ["k1"]}
    code, first = await call(daemon, "ann", "POST", "/v1/jobs/batch",
                             {"jobs": [{"command": ["true"]}] * 2}, headers=key)
    assert code == 201, first
    code, again = await call(daemon, "ann", "POST", "/v1/jobs/batch",
                             {"jobs": [{"command": ["true"]}] * 2}, headers=key)
    assert code == 200, again
    assert [j["id"] for j in again["jobs"]] == [j["id"] for j in first["jobs"]]
    response, content = await daemon.request(
        "POST", "/v1/jobs", {"command": ["true"]},
        headers={"Authorization": [f"Bearer {daemon.tokens['ann']}"],
                 "Idempotency-Key": ["k2"]})
    assert response.code == 429, content
    assert json.loads(content)["error"]["code"] == "too_many_submissions"
    assert len(await jobs_of(daemon, "ann")) == 2
    # The replay took nothing of the rate: one second gives one job.
    clock.advance(1)
    code, job = await call(daemon, "ann", "POST", "/v1/jobs", {"command": ["true"]})
    assert code == 201, job


@pytest_twisted.ensureDeferred
async def test_admins_are_unlimited_unless_a_section_says(make_daemon, tmp_path):
    """
    [quota] bounds every principal but admins; [quota:role=admin] (or an
    owner's section) bounds an admin too, and an owner's section wins over
    its role's.
    """
    daemon = await quota_daemon(
        make_daemon, "[quota]\nmax_jobs = 2\n[quota:owner=bob]\nmax_jobs = none\n")
    batch = {"jobs": [{"command": ["true"]}] * 3}
    code, made = await call(daemon, "admin", "POST", "/v1/jobs/batch", batch)
    assert code == 201, made
    await refused(daemon, "ann", "/v1/jobs/batch", batch, "too_many_jobs", "jobs")
    code, made = await call(daemon, "bob", "POST", "/v1/jobs/batch", batch)
    assert code == 201, made
    daemon = await quota_daemon(make_daemon, "[quota:role=admin]\nmax_jobs = 2\n",
                                data_dir=tmp_path / "other")
    await refused(daemon, "admin", "/v1/jobs/batch", batch, "too_many_jobs", "jobs")


@pytest_twisted.ensureDeferred
async def test_a_retry_past_max_jobs_is_refused(make_daemon):
    """
    A retry that would give the job's owner more unfinished jobs than its
    max_jobs is a 429 naming id, and the job stays as it was.
    """
    daemon = await quota_daemon(make_daemon, "[quota:owner=ann]\nmax_jobs = 1\n")
    code, job = await call(daemon, "ann", "POST", "/v1/jobs", {"command": ["true"]})
    assert code == 201, job
    code, _ = await call(daemon, "ann", "POST", f"/v1/jobs/{job['id']}/cancel")
    assert code == 200
    code, other = await call(daemon, "ann", "POST", "/v1/jobs", {"command": ["true"]})
    assert code == 201, other
    await refused(daemon, "ann", f"/v1/jobs/{job['id']}/retry", None, "too_many_jobs", "id")
    code, view = await call(daemon, "ann", "GET", f"/v1/jobs/{job['id']}")
    assert view["state"] == "cancelled"
    code, _ = await call(daemon, "ann", "POST", f"/v1/jobs/{other['id']}/cancel")
    code, view = await call(daemon, "ann", "POST", f"/v1/jobs/{job['id']}/retry")
    assert (code, view["state"]) == (200, "queued")


def test_the_document_says_what_a_quota_refuses():
    """
    Both submissions and a retry document their 429, with its Retry-After
    header and the error's retry_after.
    """
    document = openapi_document()
    for path, method in (("/v1/jobs", "post"), ("/v1/jobs/batch", "post"),
                         ("/v1/jobs/{id}/retry", "post")):
        answer = document["paths"][path][method]["responses"]["429"]
        assert "too_many_jobs" in answer["description"]
        assert answer["headers"]["Retry-After"]["schema"]["minimum"] == 1
    detail = document["components"]["schemas"]["ErrorDetail"]["properties"]
    assert "retry_after" in detail


def test_quota_sections_resolve_key_by_key():
    """
    Each key comes from the owner's section, else its role's, else
    [quota] (whose unset keys keep their defaults), except for an admin,
    whom [quota] does not bound; none is no limit, and a burst not given
    is a second of the rate.
    """
    quotas = parse_config(
        "[quota]\nrate = 10\n"
        "[quota:role=submitter]\nmax_jobs = 100\n"
        "[quota:role=admin]\nrate = 2.5\n"
        "[quota:owner=ann]\nmax_jobs = none\nburst = 7\n",
        "x.ini",
    ).quotas
    assert quotas.limits("ann", "submitter") == QuotaLimits(None, 10.0, 7)
    assert quotas.limits("bob", "submitter") == QuotaLimits(100, 10.0, DEFAULT_QUOTA.burst)
    assert quotas.limits("rita", "reader") == QuotaLimits(
        DEFAULT_QUOTA.max_jobs, 10.0, DEFAULT_QUOTA.burst)
    assert quotas.limits("root", "admin") == QuotaLimits(None, 2.5, 3)
    assert parse_config("", "x.ini").quotas.limits("root", "admin").unlimited
    assert parse_config("", "x.ini").quotas.limits("ann", "submitter") == QuotaLimits(
        DEFAULT_QUOTA.max_jobs, DEFAULT_QUOTA.rate, DEFAULT_QUOTA.burst)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[quota:role=boss]\nrate = 1\n",
         "x.ini: [quota:role=boss]: expected [quota:role=ROLE] (ROLE one of admin, "
         "submitter, reader, worker, metrics) or [quota:owner=NAME]"),
        ("[quota:ann]\nrate = 1\n", "x.ini: [quota:ann]: expected [quota:role=ROLE]"),
        ("[quota:owner=-x]\nrate = 1\n", "x.ini: [quota:owner=-x]: expected"),
        ("[quota]\nmax_jobs = 0\n",
         "x.ini: [quota] max_jobs = '0': expected an integer of at least 1, or none"),
        ("[quota:role=submitter]\nrate = -1\n",
         "x.ini: [quota:role=submitter] rate = '-1': expected a number of jobs a second "
         "above 0"),
        ("[quota:owner=ann]\nburst = none\n",
         "x.ini: [quota:owner=ann] burst = 'none': expected an integer of at least 1"),
        ("[quota]\nlimit = 3\n",
         "x.ini: [quota] limit = '3': unknown key; known: max_jobs, rate, burst"),
    ],
)
def test_a_wrong_quota_is_one_line_naming_it(text, message):
    """A quota section or key the daemon cannot use stops it with one line
    naming the file, the section, the key, the value and what is allowed."""
    with pytest.raises(ConfigError) as refused:
        parse_config(text, "x.ini")
    assert str(refused.value).startswith(message), str(refused.value)
    assert "\n" not in str(refused.value)


def test_the_configurations_roles_and_names_are_the_models():
    """The roles a [quota:role=] section may name, and the owner names a
    [quota:owner=] section may, are the model's (the configuration imports
    nothing of the package, so it keeps its own copy)."""
    assert set(ROLE_NAMES) == {role.value for role in Role}
    assert OWNER_NAME.pattern == PRINCIPAL_NAME_PATTERN
