"""
The dashboard at /ui/ in a real headless Chromium (Debian's chromium,
driven by Playwright through executable_path: no browser is downloaded),
against a real `twistd -n dispatcher`: a login with a token, jobs submitted
through the API appearing and finishing on the page without a reload, a
log followed as it is written, a cancel from the page, an array's
progress, the queues and a real worker on the workers' page, a logout.

Each page is photographed; with DISPATCHER_SCREENSHOTS=DIR the pictures
are kept there too (that is how docs/ui-*.png are made:
`DISPATCHER_SCREENSHOTS=docs .venv/bin/python -m pytest tests/test_dashboard.py`).
"""

import json
import os
import shutil

import pytest
from playwright.sync_api import expect, sync_playwright

from .conftest import WORKER_TOKEN
from .test_twistd import Twistd
from .test_worker import WorkerProcess

CHROMIUM = shutil.which("chromium")
SHOTS = os.environ.get("DISPATCHER_SCREENSHOTS")

# How long the page may take to show what the API did (ms): the events
# stream brings it within a few milliseconds; this is slack for a busy CI.
LIVE = 15000


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """One daemon for the module, with slots for several jobs and a worker
    token; stopped at its end."""
    workdir = tmp_path_factory.mktemp("dashboard")
    token_file = workdir / "worker.token"
    token_file.write_text(WORKER_TOKEN + "\n")
    token_file.chmod(0o600)
    daemon = Twistd(str(workdir), f"[executor]\nslots = 4\n\n[workers]\ntoken_file = {token_file}\n")
    daemon.start()
    daemon.token_file = token_file
    daemon.workdir = workdir
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless (as root it needs --no-sandbox)."""
    if CHROMIUM is None:
        pytest.fail("chromium is needed: apt-get install -y chromium chromium-driver "
                    "(.ci/run installs it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, dashboard):
    """A fresh browser context (no cookie) on the dashboard's login; any
    script error on the page fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 760})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(dashboard.url + "/ui/")
    yield page
    context.close()
    assert not errors, errors


def log_in(page, token):
    page.fill("#token", token)
    page.click("#login button[type=submit]")


def logged_in(page, dashboard):
    """Log in with the admin token and wait for the events stream; mark the
    document, so that a reload (which would lose the mark) shows."""
    log_in(page, dashboard.token)
    expect(page.locator("#live")).to_have_text("live", timeout=LIVE)
    page.evaluate("window.sameDocument = 'yes'")


def still_same_document(page):
    return page.evaluate("window.sameDocument") == "yes"


def go(page, hash_):
    """Navigate inside the page (the address after #): no reload."""
    page.evaluate(f"location.hash = {json.dumps(hash_)}")


def shot(page, name, tmp_path):
    page.screenshot(path=str(tmp_path / name), full_page=True)
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        page.screenshot(path=os.path.join(SHOTS, name), full_page=True)


def submit(dashboard, body):
    code, job = dashboard.request("POST", "/v1/jobs", body)
    assert code == 201, job
    return job


def test_a_wrong_token_is_refused_on_the_login_page(page, tmp_path):
    """The login page says a token that is not one is refused, and stays."""
    expect(page.locator("#token")).to_be_visible()
    shot(page, "ui-login.png", tmp_path)
    log_in(page, "dsp_not-a-token")
    expect(page.locator("#login-error")).to_contain_text("not a token this dispatcher knows")
    assert page.context.cookies() == []
    expect(page.locator("#top")).to_be_hidden()


def test_a_job_appears_and_finishes_live(page, dashboard, tmp_path):
    """Jobs submitted through the API after the page loaded show up in the
    list, and their state changes to succeeded, without a reload."""
    logged_in(page, dashboard)
    expect(page.locator("#jobs-status")).not_to_have_text("Loading…")
    gate = dashboard.workdir / "gate-live"
    job = submit(dashboard, {
        "command": ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; echo done"],
        "name": "appears-live", "labels": {"team": "ui"},
    })
    row = page.locator(f'tr[data-job="{job["id"]}"]')
    expect(row).to_be_visible(timeout=LIVE)
    expect(row.locator("[data-state]")).to_have_attribute("data-state", "running", timeout=LIVE)
    gate.touch()
    expect(row.locator("[data-state]")).to_have_attribute("data-state", "succeeded", timeout=LIVE)
    assert still_same_document(page)
    # The filters: only failed jobs: this one is not listed.
    page.check('input[name=state][value=failed]')
    page.click("#filters button[type=submit]")
    expect(page.locator("#jobs-status")).to_have_text("No jobs.", timeout=LIVE)
    go(page, "#/jobs?label=team%3Dui&order=newest")
    expect(page.locator(f'tr[data-job="{job["id"]}"]')).to_be_visible(timeout=LIVE)
    assert still_same_document(page)
    for i in range(3):
        submit(dashboard, {"command": ["true"], "name": f"shown-{i}", "labels": {"team": "ui"}})
    go(page, "#/jobs?order=newest")
    expect(page.locator("tr[data-job]")).to_have_count(4, timeout=LIVE)
    shot(page, "ui-jobs.png", tmp_path)


def test_the_jobs_are_paged_with_cursors(page, dashboard):
    """With a page size of one, the next page's link (its cursor) shows the
    next older job, and the first page's link comes back."""
    older = submit(dashboard, {"command": ["true"], "name": "paged-older"})
    newer = submit(dashboard, {"command": ["true"], "name": "paged-newer"})
    logged_in(page, dashboard)
    go(page, "#/jobs?order=newest&limit=25&name=paged-newer")
    expect(page.locator(f'tr[data-job="{newer["id"]}"]')).to_be_visible(timeout=LIVE)
    # A page of one (the address may ask any size the API takes).
    go(page, "#/jobs?order=newest&limit=1")
    first = page.locator("tr[data-job]")
    expect(first).to_have_count(1, timeout=LIVE)
    top = first.get_attribute("data-job")
    page.click("#next-page")
    expect(page.locator("tr[data-job]")).not_to_have_attribute("data-job", top, timeout=LIVE)
    page.click("#first-page")
    expect(page.locator("tr[data-job]")).to_have_attribute("data-job", top, timeout=LIVE)
    assert older["id"] != newer["id"] and still_same_document(page)


def test_a_log_is_followed_as_it_is_written(page, dashboard, tmp_path):
    """The job's page shows its output while it runs (the first line before
    the second is written), then the rest, and says the attempt ended."""
    gate = dashboard.workdir / "gate-log"
    job = submit(dashboard, {
        "command": ["sh", "-c", f"echo first line; while [ ! -e {gate} ]; do sleep 0.05; done; "
                    "echo second line; echo on stderr >&2"],
        "name": "followed",
    })
    logged_in(page, dashboard)
    go(page, f"#/jobs/{job['id']}")
    expect(page.locator("#log")).to_contain_text("first line", timeout=LIVE)
    code, now = dashboard.request("GET", f"/v1/jobs/{job['id']}")
    assert now["state"] == "running"
    assert "second line" not in page.inner_text("#log")
    expect(page.locator("#log-status")).to_have_text("following…")
    gate.touch()
    expect(page.locator("#log")).to_contain_text("second line", timeout=LIVE)
    expect(page.locator("#log-status")).to_have_text("the attempt has ended", timeout=LIVE)
    expect(page.locator("#job [data-state]")).to_have_attribute("data-state", "succeeded", timeout=LIVE)
    expect(page.locator("table.attempts tbody tr")).to_have_count(1)
    shot(page, "ui-job.png", tmp_path)
    page.select_option("#log-stream", "stderr")
    expect(page.locator("#log")).to_have_text("on stderr\n", timeout=LIVE)
    assert still_same_document(page)


def test_a_job_is_cancelled_and_retried_from_the_page(page, dashboard):
    """The Cancel button stops a running job (its process killed), and Retry
    puts it back in line: both as the API then shows them."""
    job = submit(dashboard, {"command": ["sleep", "60"], "name": "to-cancel"})
    logged_in(page, dashboard)
    go(page, f"#/jobs/{job['id']}")
    expect(page.locator("#job [data-state]")).to_have_attribute("data-state", "running", timeout=LIVE)
    expect(page.locator("#retry")).to_be_disabled()
    page.click("#cancel")
    done = dashboard.wait(job["id"], ("cancelled",))
    assert done["state"] == "cancelled"
    expect(page.locator("#job [data-state]")).to_have_attribute("data-state", "cancelled", timeout=LIVE)
    expect(page.locator("#cancel")).to_be_disabled()
    page.click("#retry")
    expect(page.locator("table.attempts tbody tr")).to_have_count(2, timeout=LIVE)
    code, again = dashboard.request("GET", f"/v1/jobs/{job['id']}")
    assert again["state"] in ("queued", "running") and len(again["attempts"]) == 2
    page.click("#cancel")
    assert dashboard.wait(job["id"], ("cancelled",))["state"] == "cancelled"
    expect(page.locator("#job-message")).to_have_text("")


def test_after_a_retry_the_log_follows_the_new_attempt(page, dashboard):
    """A failed job retried from its page: the log shown (the latest
    attempt's) becomes the new attempt's as soon as it starts."""
    job = submit(dashboard, {"command": ["sh", "-c", 'echo "attempt $DISPATCHER_ATTEMPT"; exit 3']})
    assert dashboard.wait(job["id"], ("failed",))["state"] == "failed"
    logged_in(page, dashboard)
    go(page, f"#/jobs/{job['id']}")
    expect(page.locator("#log")).to_have_text("attempt 1\n", timeout=LIVE)
    page.click("#retry")
    expect(page.locator("#log")).to_have_text("attempt 2\n", timeout=LIVE)
    expect(page.locator("#log-attempt option")).to_have_count(3)
    page.select_option("#log-attempt", "1")
    expect(page.locator("#log")).to_have_text("attempt 1\n", timeout=LIVE)


def test_an_arrays_progress_moves_live(page, dashboard, tmp_path):
    """An array's page shows how many of its members are final, and the
    number grows as each one ends; the list of groups shows it too."""
    gates = dashboard.workdir / "array-gates"
    gates.mkdir()
    made = submit(dashboard, {
        "command": ["sh", "-c", 'while [ ! -e "$GATES/$DISPATCHER_ARRAY_INDEX" ]; do sleep 0.05; done'],
        "env": {"GATES": str(gates)}, "array": 3, "name": "progress",
    })
    array_id = made["jobs"][0]["array_id"]
    logged_in(page, dashboard)
    go(page, f"#/arrays/{array_id}")
    text = page.locator("#group .progress-text")
    expect(text).to_have_text("0/3", timeout=LIVE)
    expect(page.locator("#members tr[data-job]")).to_have_count(3)
    (gates / "0").touch()
    expect(text).to_have_text("1/3", timeout=LIVE)
    (gates / "1").touch()
    expect(text).to_have_text("2/3", timeout=LIVE)
    shot(page, "ui-array.png", tmp_path)
    (gates / "2").touch()
    expect(text).to_have_text("3/3", timeout=LIVE)
    expect(page.locator("#group-final")).to_have_text("yes: every member succeeded", timeout=LIVE)
    assert page.locator("#group progress").get_attribute("value") == "3"
    code, batch = dashboard.request("POST", "/v1/jobs/batch", {"jobs": [
        {"command": ["true"]}, {"command": ["false"]}]})
    assert code == 201, batch
    go(page, "#/groups")
    expect(page.locator(f'tr[data-group="{array_id}"] .progress-text')).to_have_text("3/3", timeout=LIVE)
    expect(page.locator(f'tr[data-group="{batch["batch_id"]}"] .progress-text')).to_have_text(
        "2/2", timeout=LIVE)
    shot(page, "ui-groups.png", tmp_path)
    assert still_same_document(page)


def test_queues_and_a_workers_arrival(page, dashboard, tmp_path):
    """The queues' page counts the jobs by state; a real worker that
    connects appears on the workers' page without a reload."""
    logged_in(page, dashboard)
    go(page, "#/queues")
    cell = page.locator('tr[data-queue="default"] td[data-state="succeeded"]')
    expect(cell).not_to_have_text("0", timeout=LIVE)
    code, queues = dashboard.request("GET", "/v1/queues")
    expect(cell).to_have_text(str(queues["queues"]["default"]["counts"]["succeeded"]), timeout=LIVE)
    shot(page, "ui-queues.png", tmp_path)
    go(page, "#/workers")
    expect(page.locator("#workers")).to_contain_text("No worker", timeout=LIVE)
    worker = WorkerProcess(tmp_path, dashboard.url, dashboard.token_file, name="w-ui").start()
    try:
        expect(page.locator('tr[data-worker="w-ui"]')).to_be_visible(timeout=LIVE)
        shot(page, "ui-workers.png", tmp_path)
        assert still_same_document(page)
    finally:
        assert worker.stop() == 0


def test_logout_ends_the_session(page, dashboard):
    """Log out shows the login again, and the cookie the browser had no
    longer opens the API, even if a page kept it."""
    logged_in(page, dashboard)
    cookies = page.context.cookies()
    assert [c["name"] for c in cookies] == ["dispatcher-session"]
    cookie = cookies[0]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert page.evaluate("document.cookie") == ""
    page.click("#logout")
    expect(page.locator("#login-error")).to_have_text("Logged out.")
    assert page.context.cookies() == []
    # The old cookie, sent again by hand, is refused.
    page.context.add_cookies([{**cookie}])
    answer = page.request.get(dashboard.url + "/v1/jobs")
    assert answer.status == 401
