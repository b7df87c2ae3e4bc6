"""
The real daemon (`twistd -n dispatcher`) on the PostgreSQL store, chosen
by C{[store] url}: jobs submitted over HTTP run and succeed, and a restart
finds them and their logs; a bad URL stops start-up with one line.  Each
test has a database of its own on the real PostgreSQL
(tests/postgres.py); the kill -9 test under load runs on it too
(tests/test_crash.py).
"""

import os
import subprocess
import sys
import urllib.request

import pytest

from tests.postgres import Databases, require_postgres
from tests.test_twistd import BIN, ROOT, Twistd


@pytest.fixture
def database():
    """The URL of a database of the test's own, dropped at teardown."""
    made = Databases()
    yield made.url("db")
    made.drop()


def read_log(daemon, job_id):
    request = urllib.request.Request(
        f"{daemon.url}/v1/jobs/{job_id}/log",
        headers={"Authorization": f"Bearer {daemon.token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def test_jobs_and_their_logs_outlive_a_restart(tmp_path, database):
    """A job submitted over HTTP to a daemon on PostgreSQL runs and
    succeeds; after a restart the daemon serves it, its attempt and its log
    as before, and the jobs are rows of that database."""
    daemon = Twistd(str(tmp_path), f"[store]\nurl = {database}\n")
    try:
        daemon.start()
        code, job = daemon.request(
            "POST", "/v1/jobs", {"command": ["sh", "-c", "echo hello from postgres"]}
        )
        assert code == 201, job
        done = daemon.wait(job["id"], ("succeeded", "failed"))
        assert done["state"] == "succeeded", done
        assert b"hello from postgres" in read_log(daemon, job["id"])
        daemon.stop_gracefully()

        daemon.start()
        code, again = daemon.request("GET", f"/v1/jobs/{job['id']}")
        assert code == 200
        assert again["state"] == "succeeded"
        assert [a["exit_code"] for a in again["attempts"]] == [0]
        assert b"hello from postgres" in read_log(daemon, job["id"])
        # Stored in PostgreSQL, not in a file of the data directory.
        assert not os.path.exists(os.path.join(tmp_path, "data", "dispatcher.sqlite3"))
        import psycopg

        with psycopg.connect(database) as conn:
            assert conn.execute(
                "SELECT state FROM jobs WHERE id = %s", (job["id"],)
            ).fetchone() == ("succeeded",)
    finally:
        daemon.stop()


@pytest.mark.parametrize("url, message", [
    ("mysql://db/jobs",
     "[store] url = 'mysql://db/jobs': expected a PostgreSQL URL"),
    ("postgresql://ann:secret@db:port/jobs",
     "[store] url = 'postgresql://ann:***@db:port/jobs': expected a PostgreSQL URL"),
])
def test_a_bad_store_url_is_one_line(tmp_path, url, message):
    """A [store] url that is not a PostgreSQL URL stops start-up with one
    line naming the key, and never shows the password."""
    config = tmp_path / "dispatcher.ini"
    config.write_text(f"[store]\nurl = {url}\n")
    result = subprocess.run(
        [os.path.join(BIN, "twistd"), "-n", "--pidfile", "", "dispatcher",
         "--config", str(config), "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    output = result.stdout + result.stderr
    assert message in output
    assert "secret" not in output
    assert [line for line in output.splitlines() if "[store]" in line] == [
        line for line in output.splitlines() if message in line
    ]


def test_an_unreachable_database_stops_start_up_in_one_line(tmp_path):
    """A database that does not answer stops start-up with one line naming
    it (without its password), not a traceback."""
    require_postgres()
    daemon = Twistd(
        str(tmp_path),
        "[store]\nurl = postgresql://postgres:secret@127.0.0.1:5432/dispatcher_none\n",
    )
    with pytest.raises(AssertionError, match="twistd exited"):
        daemon.start()
    text = open(os.path.join(tmp_path, "out.log")).read()
    assert "the store postgresql://postgres@127.0.0.1:5432/dispatcher_none cannot be opened" in text
    assert "secret" not in text
    assert "Traceback" not in text
    assert sys.executable  # the daemon ran under the suite's interpreter


def test_the_store_commands_say_they_are_sqlites(tmp_path):
    """dispatcher store check (backup, restore) on a configuration that keeps
    jobs in PostgreSQL says in one line that they are the SQLite file's and
    what to use instead, and checks no file."""
    config = tmp_path / "dispatcher.ini"
    config.write_text("[store]\nurl = postgresql://postgres@127.0.0.1/whatever\n")
    result = subprocess.run(
        [os.path.join(BIN, "dispatcher"), "store", "check", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "keeps jobs in PostgreSQL ([store] url)" in result.stderr
    assert "pg_dump" in result.stderr
