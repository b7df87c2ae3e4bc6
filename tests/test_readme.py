"""
The README's walk-through runs as written: its shell blocks, in order, in
one bash session, against a real `twistd -n dispatcher` started with
etc/dispatcher.ini as shipped (its example task included), told where the
daemon is and who calls through the environment variables the README
names.

The harness knows nothing of what the blocks hold: it runs every ```sh
block under the "Walk-through" heading with `set -eo pipefail` (a
command that fails fails its block), then judges the outcome through the
API: $ID names a job that succeeded, whose output the blocks printed, and
the example task ran on the input served here and counted it right.
"""

import hashlib
import http.server
import os
import re
import subprocess
import threading
import uuid

import pytest

from .test_twistd import ROOT, Twistd

README = os.path.join(ROOT, "README.md")
HEADING = "## Walk-through"

# The input the task counts, served on loopback.
INPUT = b"".join(b"word %d of the walk-through\n" % i for i in range(1000))


def walkthrough_blocks(text):
    """The ```sh blocks between the walk-through's heading and the next
    heading of its level, in order."""
    start = text.index(f"\n{HEADING}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else len(text)]
    return re.findall(r"^```sh\n(.*?)^```$", section, re.S | re.M)


def shipped_config():
    """etc/dispatcher.ini as shipped, with two changes a test needs: the
    example task's directory made absolute (the file is copied elsewhere),
    and loopback allowed as an input's source (the input is served here)."""
    with open(os.path.join(ROOT, "etc", "dispatcher.ini")) as f:
        text = f.read()
    text, paths = re.subn(r"^path = tasks$", f"path = {ROOT}/etc/tasks", text, flags=re.M)
    text, allows = re.subn(r"^# allow =$", "allow = 127.0.0.1", text, flags=re.M)
    assert (paths, allows) == (1, 1), "etc/dispatcher.ini changed: update this test"
    return text


@pytest.fixture
def input_url():
    """INPUT served over HTTP on loopback."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(INPUT)))
            self.end_headers()
            self.wfile.write(INPUT)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/words.txt"
    server.shutdown()
    server.server_close()


def run_blocks(blocks, workdir, env, timeout=120):
    """Run blocks in one bash session; each one's stdout, stderr and
    whether it finished, and the session's $ID at the end."""
    out = os.path.join(workdir, "blocks")
    os.mkdir(out)
    script = ["set -eo pipefail"]
    for i, block in enumerate(blocks):
        script += ["{", block.rstrip("\n"), f"}} >{out}/{i}.out 2>{out}/{i}.err",
                   f": >{out}/{i}.ok"]
    script.append(f'printf %s "${{ID-}}" >{out}/ID')
    result = subprocess.run(
        ["bash", "--noprofile", "--norc", "-s"], input="\n".join(script) + "\n",
        text=True, cwd=workdir, env=env, capture_output=True, timeout=timeout)
    ran = []
    for i in range(len(blocks)):
        def read(name):
            path = os.path.join(out, f"{i}.{name}")
            return open(path).read() if os.path.exists(path) else None
        ran.append((read("out"), read("err"), read("ok") is not None))
    variable = os.path.join(out, "ID")
    return result, ran, open(variable).read() if os.path.exists(variable) else None


def test_the_readme_walkthrough_runs_as_written(tmp_path, input_url):
    """Every shell block of the walk-through exits 0, in order, in one
    session against a real daemon with the shipped configuration; it sets
    $ID to a job that succeeded and showed its output, and the example task
    counted the input it was given."""
    with open(README) as f:
        blocks = walkthrough_blocks(f.read())
    assert len(blocks) >= 4, "the README's walk-through has lost its shell blocks"
    (tmp_path / "d").mkdir()
    daemon = Twistd(str(tmp_path / "d"), shipped_config())
    daemon.start()
    try:
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "LANG": "C.UTF-8",
            "DISPATCHER_URL": daemon.url,
            "DISPATCHER_TOKEN": daemon.token,
            "INPUT_URL": input_url,
        }
        shell = tmp_path / "shell"
        shell.mkdir()
        result, ran, job_id = run_blocks(blocks, str(shell), env)
        for i, (out, err, finished) in enumerate(ran):
            assert finished, (
                f"walk-through block {i + 1} failed (bash exited {result.returncode}):\n"
                f"{blocks[i]}\n--- its stdout:\n{out}\n--- its stderr:\n{err}\n"
                f"--- bash:\n{result.stderr}")
        assert result.returncode == 0, result.stderr
        printed = "".join(out for out, _, _ in ran)

        # $ID names a job that succeeded, and its output was shown.
        assert uuid.UUID(job_id).version == 7, job_id
        code, job = daemon.request("GET", f"/v1/jobs/{job_id}")
        assert code == 200 and job["state"] == "succeeded", job
        log = subprocess.run(
            ["curl", "-sf", "-H", f"Authorization: Bearer {daemon.token}",
             f"{daemon.url}/v1/jobs/{job_id}/log"], capture_output=True, text=True).stdout
        assert log and log in printed, (log, printed)

        # The example task ran on the input served here, and counted it.
        code, page = daemon.request("GET", "/v1/jobs?limit=1000")
        tasks = [j for j in page["jobs"] if j.get("task") == "wordcount"]
        assert tasks, page
        for task in tasks:
            assert task["state"] == "succeeded", task
            assert task["inputs"][0]["url"] == input_url
            assert task["inputs"][0]["sha256"] == hashlib.sha256(INPUT).hexdigest()
            assert task["result"] == {
                "lines": INPUT.count(b"\n"), "words": len(INPUT.split()), "bytes": len(INPUT)}
        # Nothing the walk-through made failed, and nothing is left running.
        assert all(j["state"] in ("succeeded", "cancelled") for j in page["jobs"]), [
            (j["id"], j["state"], j["error"]) for j in page["jobs"]]
    finally:
        daemon.stop()


def test_the_harness_runs_blocks_in_one_session_and_stops_at_a_failure(tmp_path):
    """Blocks share one shell (a variable set in one is seen by the next);
    a command that fails inside a block, even before its last, fails that
    block, and no later block runs."""
    blocks = ["ID=abc\necho one", 'test "$ID" = abc\nfalse\necho after', "echo never"]
    result, ran, _ = run_blocks(blocks, str(tmp_path), {"PATH": os.environ["PATH"]})
    assert ran[0] == ("one\n", "", True)
    assert ran[1][2] is False and ran[1][0] == ""
    assert ran[2] == (None, None, False)
    assert result.returncode != 0
    (tmp_path / "again").mkdir()
    _, ran, job_id = run_blocks(["ID=xyz"], str(tmp_path / "again"), {"PATH": os.environ["PATH"]})
    assert ran[0][2] and job_id == "xyz"
