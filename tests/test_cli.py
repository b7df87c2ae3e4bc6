"""
The dispatcher command's API commands (issue 17): what they send, built
from their options; their exit statuses and one-line errors; shell
completion; and, against a real twistd, what a person and a script see:
tables, JSON that parses, wait's exit statuses, and wait's progress bar
and logs -f in a real terminal (a pty).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pexpect
import pytest

from dispatcher.cli._submit import (
    SubmissionError,
    input_file,
    job_fields,
    key_values,
    merge,
    read_jobs,
)

from .test_twistd import BIN, ROOT, Twistd

DISPATCHER = os.path.join(BIN, "dispatcher")


def run(*args, env=None, input=None, timeout=60):
    """The dispatcher command, run as a script runs it (no terminal)."""
    return subprocess.run([DISPATCHER, *args], env=env or dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=timeout, input=input)


# What submit sends, from its options (no dispatcher needed)

def test_key_value_options_become_maps_and_a_missing_equals_is_named():
    """--label/--env/--require KEY=VALUE pairs become a map (a value may hold
    '=', the later of a repeated key wins); a pair without '=' is refused
    naming the option and the pair."""
    assert key_values("--label", ["team=ice", "q=a=b", "team=fire"]) == {
        "team": "fire", "q": "a=b"}
    with pytest.raises(SubmissionError, match=r"--env 'PATH': expected KEY=VALUE"):
        key_values("--env", ["PATH"])
    with pytest.raises(SubmissionError, match="--label '=v'"):
        key_values("--label", ["=v"])


def test_an_input_names_its_url_its_path_and_its_digest():
    """--input URL=PATH#SHA256 splits at the last '=' and at '#'; without a
    path the file is named as the URL's last segment; a URL that is not
    http(s), or that names no file and says no path, is refused."""
    sha = "ab" * 32
    assert input_file(f"https://h.example/d/a.txt=in/a.txt#{sha}") == {
        "url": "https://h.example/d/a.txt", "path": "in/a.txt", "sha256": sha}
    assert input_file("https://h.example/d/a.txt") == {
        "url": "https://h.example/d/a.txt", "path": "a.txt"}
    assert input_file("http://h.example/f?x=1=f.txt") == {
        "url": "http://h.example/f?x=1", "path": "f.txt"}
    with pytest.raises(SubmissionError, match="http"):
        input_file("ftp://h.example/a.txt")
    with pytest.raises(SubmissionError, match="names no file"):
        input_file("https://h.example/")


def test_the_command_line_gives_only_the_fields_it_names():
    """job_fields sends only what was given (so the server's defaults and a
    file's own fields stand), turns --after into depends_on and the
    resources into one object, parses --args/--kwargs as JSON of the right
    kind, and refuses --notify-on without --notify."""
    assert job_fields(command=["true"]) == {"command": ["true"]}
    fields = job_fields(
        task="add", args="[1, 2]", kwargs='{"n": 3}', name="n", labels=["a=b"],
        queue="q", priority=5, array=3, after=["x", "y"], timeout=1.5, max_attempts=2,
        cpus=0.5, gpus=1, requirements=["site=a"], inputs=["https://h.example/a.txt=a"],
        notify="https://hook.example/", notify_on=["failed"])
    assert fields == {
        "task": "add", "args": [1, 2], "kwargs": {"n": 3}, "name": "n",
        "labels": {"a": "b"}, "queue": "q", "priority": 5, "array": 3,
        "depends_on": ["x", "y"], "timeout": 1.5, "max_attempts": 2,
        "resources": {"cpus": 0.5, "gpus": 1}, "requirements": {"site": "a"},
        "inputs": [{"url": "https://h.example/a.txt", "path": "a"}],
        "notify": {"url": "https://hook.example/", "events": ["failed"]}}
    with pytest.raises(SubmissionError, match="--args: expected a JSON array"):
        job_fields(args='{"a": 1}')
    with pytest.raises(SubmissionError, match="--kwargs: not JSON"):
        job_fields(kwargs="{")
    with pytest.raises(SubmissionError, match="--notify-on: only with --notify"):
        job_fields(notify_on=["failed"])


def test_a_file_holds_a_job_a_batch_or_json_lines():
    """--file reads one job (an object: not a batch), a batch ({"jobs": []}
    or an array of jobs) or JSON lines (a batch; blank lines skipped); a
    line that is not a JSON object is refused naming the file and line."""
    assert read_jobs("f", '{"command": ["true"]}') == ([{"command": ["true"]}], False)
    assert read_jobs("f", '{"jobs": [{"command": ["a"]}, {"task": "t"}]}') == (
        [{"command": ["a"]}, {"task": "t"}], True)
    assert read_jobs("f", '[{"command": ["a"]}]') == ([{"command": ["a"]}], True)
    assert read_jobs("f", '{"command": ["a"]}\n\n{"command": ["b"]}\n') == (
        [{"command": ["a"]}, {"command": ["b"]}], True)
    with pytest.raises(SubmissionError, match="--file jobs.jsonl: line 2 is not JSON"):
        read_jobs("jobs.jsonl", '{"command": ["a"]}\n{oops\n')
    with pytest.raises(SubmissionError, match="line 1: expected a JSON object"):
        read_jobs("f", '[1]\n[2]\n')
    with pytest.raises(SubmissionError, match="holds no job"):
        read_jobs("f", "\n\n")
    with pytest.raises(SubmissionError, match="expected a job"):
        read_jobs("f", "[]")


def test_the_command_line_goes_over_a_files_jobs():
    """The command line's fields go over each job of a file: maps merged key
    by key, inputs and dependencies added to, the rest replaced."""
    job = {"command": ["a"], "labels": {"x": "1", "y": "2"}, "depends_on": ["d1"],
           "queue": "slow"}
    assert merge(job, {"labels": {"y": "3"}, "depends_on": ["d2"], "queue": "fast"}) == {
        "command": ["a"], "labels": {"x": "1", "y": "3"}, "depends_on": ["d1", "d2"],
        "queue": "fast"}
    assert job["labels"] == {"x": "1", "y": "2"}


# Exit statuses and usage errors (no dispatcher needed)

@pytest.mark.parametrize("args, says", [
    (["submit"], "nothing to run"),
    (["submit", "--label", "x", "--", "true"], "--label 'x': expected KEY=VALUE"),
    (["submit", "--file", "/nonexistent/jobs.json"], "cannot read it"),
    (["submit", "--file", "-", "--", "true"], "no command"),
    (["wait"], "one of them"),
    (["wait", "x", "--array", "y"], "one of them"),
    (["wait", "x", "--timeout", "0"], "--timeout"),
    (["cancel"], "one of them"),
    (["ls", "--watch", "--json"], "events --json"),
    (["ls", "--state", "done"], "--state"),
    (["ls", "--limit", "0"], "--limit"),
    (["logs"], "ID"),
    (["frobnicate"], "No such command"),
])
def test_a_usage_error_exits_2_and_names_what_is_wrong(args, says):
    """A usage error (a missing or malformed option or argument) exits 2
    before reaching any dispatcher, saying what is wrong on stderr."""
    done = run(*args, "--url", "http://127.0.0.1:1") if args[0] != "frobnicate" else run(*args)
    assert done.returncode == 2, done
    assert says in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unreachable_dispatcher_is_one_line_naming_its_url():
    """A command whose dispatcher cannot be reached exits 1 with one line on
    stderr that names the URL it tried (from --url, or DISPATCHER_URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    done = run("ls", "--url", url)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"dispatcher ls: cannot reach the dispatcher at {url} (")
    done = run("show", "x", env=dict(os.environ, PYTHONPATH=ROOT, DISPATCHER_URL=url))
    assert done.returncode == 1 and url in done.stderr and done.stderr.count("\n") == 1


def test_the_local_commands_keep_their_parsers_and_exit_statuses(tmp_path):
    """worker, store and token hand everything, --help included, to their
    own parsers: their help is theirs, a usage error exits 2 with their
    message, and they run."""
    done = run("worker", "--help")
    assert done.returncode == 0 and "--slots" in done.stdout and "--token-file" in done.stdout
    done = run("worker", "--slots", "1")
    assert done.returncode == 2
    assert done.stderr.startswith("dispatcher worker: --url is required")
    done = run("store")
    assert done.returncode == 2 and "usage: dispatcher store" in done.stderr
    done = run("token", "ls", "--data-dir", str(tmp_path))
    assert (done.returncode, done.stdout) == (0, "")
    done = run("--help")
    assert done.returncode == 0
    for name in ("submit", "ls", "wait", "logs", "events", "worker", "store", "token"):
        assert re.search(rf"^  {name}\s", done.stdout, re.M), name


def test_the_api_commands_load_no_server_code():
    """The dispatcher command, with its API commands built, loads no
    server layer (api, store, core, http, workers) and no reactor: it
    starts fast for completion and runs where no dispatcher is installed
    to run."""
    code = ("import sys, dispatcher.app._cli as c; c.command(); "
            "import dispatcher.cli._commands, dispatcher.cli._wait, dispatcher.cli._render;"
            "print('\\n'.join(sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, env=dict(os.environ, PYTHONPATH=ROOT)).stdout.split()
    layers = {m.split(".")[1] for m in loaded if m.startswith("dispatcher.") and "." in m}
    assert layers & {"api", "store", "core", "http", "workers"} == set()
    assert "twisted.internet.reactor" not in loaded


# Shell completion

def complete(shell, words, cword=None):
    env = dict(os.environ, PYTHONPATH=ROOT, _DISPATCHER_COMPLETE=f"{shell}_complete",
               COMP_WORDS=" ".join(words), COMP_CWORD=str(len(words) - 1 if cword is None
                                                            else cword))
    done = subprocess.run([DISPATCHER], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_shell_completion_offers_commands_options_and_states():
    """click's completion (the protocol the scripts of 'dispatcher
    completion SHELL' speak) offers the commands, a command's options and
    the states a --state takes."""
    assert "plain,submit" in complete("bash", ["dispatcher", "su"]).split()
    assert {"plain,logs", "plain,ls"} <= set(complete("bash", ["dispatcher", "l"]).split())
    assert "plain,--state" in complete("bash", ["dispatcher", "ls", "--st"]).split()
    assert complete("bash", ["dispatcher", "ls", "--state", "r"]).split() == ["plain,running"]
    assert complete("zsh", ["dispatcher", "wai"]).splitlines()[:2] == ["plain", "wait"]


@pytest.mark.parametrize("shell, marker", [
    ("bash", "complete -o nosort -F _dispatcher_completion dispatcher"),
    ("zsh", "#compdef dispatcher"),
    ("fish", "complete --no-files --command dispatcher"),
])
def test_the_completion_command_prints_the_shells_script(shell, marker):
    """dispatcher completion SHELL prints the script that shell sources,
    which calls the command back with _DISPATCHER_COMPLETE set."""
    done = run("completion", shell)
    assert done.returncode == 0
    assert marker in done.stdout and "_DISPATCHER_COMPLETE" in done.stdout


# Against a real twistd

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One real `twistd -n dispatcher` for the module's tests, each of which
    finds its own jobs again by a label or a name of its own."""
    from .conftest import TEST_TASKS

    workdir = tmp_path_factory.mktemp("cli")
    daemon = Twistd(str(workdir), "[executor]\nslots = 8\n" + TEST_TASKS)
    daemon.start()
    daemon.env = dict(os.environ, PYTHONPATH=ROOT, DISPATCHER_URL=daemon.url,
                      DISPATCHER_TOKEN_FILE=os.path.join(workdir, "data", "admin.token"),
                      TERM="xterm", COLUMNS="160", LINES="40")
    daemon.env.pop("DISPATCHER_TOKEN", None)
    yield daemon
    daemon.stop()


def cli(daemon, *args, ok=True, **kwargs):
    """The dispatcher command against the module's daemon, as a script runs
    it; with ok, it must have succeeded."""
    done = run(*args, env=daemon.env, **kwargs)
    if ok:
        assert done.returncode == 0, done
    return done


def submitted(daemon, *args):
    """Submit; the id it printed, alone on stdout."""
    done = cli(daemon, "submit", *args)
    assert UUID.match(done.stdout.strip()), done.stdout
    return done.stdout.strip()


def test_submit_show_ls_and_logs_for_a_person_and_for_a_script(daemon):
    """submit prints the new job's id alone; wait exits 0 once it
    succeeded; show, ls and logs show it to a person (a table, its output
    as written) and to a script (--json documents that parse, holding the
    same job); ls's filters find it and only it."""
    job_id = submitted(daemon, "--name", "greet-1", "--label", "case=round-trip",
                       "--", "sh", "-c", "echo hello; echo oops >&2")
    waited = cli(daemon, "wait", job_id, "--json")
    job = json.loads(waited.stdout)
    assert (job["id"], job["state"], job["exit_code"]) == (job_id, "succeeded", 0)
    assert job["name"] == "greet-1" and job["labels"] == {"case": "round-trip"}
    shown = cli(daemon, "show", job_id)
    assert re.search(r"^state\s+succeeded$", shown.stdout, re.M), shown.stdout
    assert re.search(r"^runs\s+sh -c 'echo hello; echo oops >&2'$", shown.stdout, re.M)
    assert json.loads(cli(daemon, "show", job_id, "--json").stdout)["id"] == job_id
    listed = cli(daemon, "ls", "--label", "case=round-trip")
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:4] == ["ID", "STATE", "NAME", "QUEUE"]
    assert [row.split()[:3] for row in rows] == [[job_id, "succeeded", "greet-1"]]
    assert [j["id"] for j in json.loads(
        cli(daemon, "ls", "--name", "greet-1", "--json").stdout)] == [job_id]
    assert json.loads(cli(daemon, "ls", "--label", "case=round-trip", "--state", "failed",
                          "--json").stdout) == []
    assert cli(daemon, "logs", job_id).stdout == "hello\n"
    assert cli(daemon, "logs", job_id, "--stderr").stdout == "oops\n"
    assert cli(daemon, "logs", job_id, "--attempt", "1", "--offset", "2").stdout == "llo\n"
    piece = json.loads(cli(daemon, "logs", job_id, "--json").stdout)
    assert piece == {"job_id": job_id, "stream": "stdout", "offset": 0, "text": "hello\n"}


def test_ls_lists_newest_first_and_says_when_there_are_more(daemon):
    """ls --newest reverses the order; --limit shows that many and says on
    stderr, not in the table, that there are more."""
    ids = [submitted(daemon, "--label", "case=order", "--", "true") for _ in range(3)]
    listed = cli(daemon, "ls", "--label", "case=order", "--json")
    assert [j["id"] for j in json.loads(listed.stdout)] == ids
    listed = cli(daemon, "ls", "--label", "case=order", "--newest", "--limit", "2")
    assert [row.split()[0] for row in listed.stdout.splitlines()[1:]] == ids[::-1][:2]
    assert "more than 2 jobs" in listed.stderr


def test_a_task_job_with_its_arguments(daemon):
    """submit --task with --args runs a task; submit --wait --json prints
    the finished job, with the task's result."""
    done = cli(daemon, "submit", "--task", "add", "--args", "[2, 3]", "--wait", "--json")
    job = json.loads(done.stdout)
    assert (job["state"], job["result"], job["task"]) == ("succeeded", 5, "add")


def test_wait_exits_with_how_the_jobs_ended(daemon):
    """wait exits 1 for a failed job, 3 when its --timeout runs out first
    (saying so), 1 for a cancelled one, and 1 when any of several jobs
    did not succeed; cancel, retry and rm say what became of each job."""
    failed = submitted(daemon, "--", "sh", "-c", "exit 3")
    done = cli(daemon, "wait", failed, "--json", ok=False)
    assert done.returncode == 1 and json.loads(done.stdout)["exit_code"] == 3
    slow = submitted(daemon, "--", "sleep", "60")
    started = time.monotonic()
    done = cli(daemon, "wait", slow, "--timeout", "0.5", ok=False)
    assert done.returncode == 3 and "not finished after 0.5 s" in done.stderr
    assert time.monotonic() - started < 10
    done = cli(daemon, "cancel", slow)
    assert done.stdout.startswith(("cancelled " + slow, "cancelling " + slow))
    ok = submitted(daemon, "--", "true")
    done = cli(daemon, "wait", ok, slow, failed, "--json", ok=False)
    assert done.returncode == 1
    assert [j["state"] for j in json.loads(done.stdout)] == ["succeeded", "cancelled", "failed"]
    assert cli(daemon, "wait", ok, "--quiet").stdout == ""
    done = cli(daemon, "retry", failed)
    assert done.stdout == f"retrying {failed} (queued)\n" or failed in done.stdout
    assert cli(daemon, "wait", failed, ok=False).returncode == 1
    done = cli(daemon, "rm", failed, "--json")
    assert json.loads(done.stdout) == {"id": failed}
    done = cli(daemon, "show", failed, ok=False)
    assert done.returncode == 1
    assert done.stderr.startswith("dispatcher show: ") and "404 not_found" in done.stderr
    assert done.stderr.count("\n") == 1


def test_the_dispatchers_refusals_are_one_line_naming_the_field(daemon, tmp_path):
    """A refusal is one line on stderr with the server's message, status,
    code and field, and exit 1; with several ids, the others are still
    done; a wrong credential says how to give one."""
    done = cli(daemon, "submit", "--priority", "99999999", "--", "true", ok=False)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert "(400 invalid_field, field priority)" in done.stderr
    unknown = "0193a1c2-5b7e-7c41-9d2e-3f1a2b4c5d6e"
    doomed = submitted(daemon, "--", "sleep", "60")
    done = cli(daemon, "cancel", unknown, doomed, ok=False)
    assert done.returncode == 1
    assert done.stderr.startswith(f"dispatcher cancel {unknown}: ")
    assert doomed in done.stdout
    wrong = tmp_path / "wrong.token"
    wrong.write_text("dsp_not-a-token-of-this-dispatcher\n")
    done = cli(daemon, "ls", "--token-file", str(wrong), ok=False)
    assert done.returncode == 1 and "(401 unauthorized" in done.stderr
    assert "--token-file" in done.stderr
    done = cli(daemon, "--token-file", str(tmp_path / "none"), "me", ok=False)
    assert done.returncode == 1 and "cannot read it" in done.stderr


def test_queues_workers_and_me(daemon):
    """queues, workers and me answer a table or a line for a person and
    JSON that parses for a script."""
    assert cli(daemon, "me").stdout.startswith(f"admin (admin) at {daemon.url}")
    assert json.loads(cli(daemon, "me", "--json").stdout)["role"] == "admin"
    queues = json.loads(cli(daemon, "queues", "--json").stdout)
    assert queues["default"]["counts"]["succeeded"] >= 0
    assert re.search(r"^default\s", cli(daemon, "queues").stdout, re.M)
    assert json.loads(cli(daemon, "workers", "--json").stdout) == []
    assert cli(daemon, "workers").stdout.split() == [
        "NAME", "SLOTS", "RUNNING", "CPUS", "MEMORY", "MB", "GPUS", "LABELS", "LAST",
        "CONTACT"]


def test_arrays_and_batches_are_submitted_waited_for_and_listed(daemon, tmp_path):
    """submit --array prints the array's id, and --file with JSON lines the
    batch's; wait --array/--batch exits 0 once all succeeded, with the
    group's JSON; ls --array lists the members; show tells a group's
    counts; cancel --array and retry --array act on the members."""
    array_id = submitted(daemon, "--array", "3", "--label", "case=array", "--",
                         "sh", "-c", "echo $DISPATCHER_ARRAY_INDEX")
    group = json.loads(cli(daemon, "wait", "--array", array_id, "--json").stdout)
    assert (group["kind"], group["size"], group["final"], group["succeeded"]) == (
        "array", 3, True, True)
    members = json.loads(cli(daemon, "ls", "--array", array_id, "--json").stdout)
    assert sorted(j["array_index"] for j in members) == [0, 1, 2]
    shown = cli(daemon, "show", array_id).stdout
    assert re.search(r"^finished\s+3 of 3$", shown, re.M)
    assert re.search(r"^states\s+succeeded 3$", shown, re.M), shown
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"command": ["true"], "name": "one"}\n'
                    '{"command": ["sh", "-c", "exit 1"], "name": "two"}\n')
    batch_id = submitted(daemon, "--file", str(jobs), "--label", "case=batch")
    done = cli(daemon, "wait", "--batch", batch_id, ok=False)
    assert done.returncode == 1
    members = json.loads(cli(daemon, "ls", "--batch", batch_id, "--json").stdout)
    assert [(j["name"], j["state"], j["labels"]) for j in members] == [
        ("one", "succeeded", {"case": "batch"}), ("two", "failed", {"case": "batch"})]
    slow = submitted(daemon, "--array", "2", "--", "sleep", "60")
    done = cli(daemon, "cancel", "--array", slow)
    assert done.stdout.startswith(f"cancelling array {slow}")
    assert cli(daemon, "wait", "--array", slow, ok=False).returncode == 1
    assert cli(daemon, "retry", "--array", slow).stdout == f"retrying array {slow}\n"
    cli(daemon, "cancel", "--array", slow)


def test_events_prints_the_stream_with_its_filters(daemon):
    """events --job ID --after 0 --count N prints that job's state changes
    from the start, as lines for a person and JSON lines for a script."""
    job_id = submitted(daemon, "--", "true")
    cli(daemon, "wait", job_id)
    done = cli(daemon, "events", "--job", job_id, "--after", "0", "--count", "2", "--json",
               timeout=30)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["type"] for e in events] == ["job", "job"]
    assert {e["data"]["job_id"] for e in events} == {job_id}
    assert events[0]["id"] < events[1]["id"]
    done = cli(daemon, "events", "--job", job_id, "--after", "0", "--count", "1", timeout=30)
    assert f"job {job_id}" in done.stdout


def test_job_ids_complete_from_the_dispatcher(daemon):
    """Completing an id asks the dispatcher for the newest jobs and offers
    those that start with what was typed, with their state as help."""
    job_id = submitted(daemon, "--name", "completed-one", "--", "true")
    env = dict(daemon.env, _DISPATCHER_COMPLETE="zsh_complete",
               COMP_WORDS=f"dispatcher show {job_id[:20]}", COMP_CWORD="2")
    done = subprocess.run([DISPATCHER], env=env, capture_output=True, text=True, timeout=60)
    assert job_id in done.stdout.splitlines()


# In a real terminal

def _as_in_a_shell():
    # A person's shell runs a command in the foreground with SIGINT at its
    # default, whatever it was here: a suite started in the background of
    # a script has it ignored (POSIX), which the command would inherit.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def terminal(daemon, *args, timeout=30):
    """The dispatcher command in a pseudo-terminal, as a person runs it."""
    # NO_COLOR: rich draws the same, without colours between the words
    # the test looks for.
    return pexpect.spawn(DISPATCHER, list(args), env=dict(daemon.env, NO_COLOR="1"),
                         timeout=timeout, preexec_fn=_as_in_a_shell,
                         dimensions=(40, 160), encoding="utf-8")


def test_wait_draws_a_progress_bar_that_ends_at_100_percent(daemon):
    """In a terminal, wait draws a progress bar on stderr while the job
    runs (0 of 1 done), ends it at 1 of 1, 100%, then shows the job and
    exits 0."""
    job_id = submitted(daemon, "--", "sleep", "2")
    child = terminal(daemon, "wait", job_id)
    child.expect(rf"job {job_id}.*0/1\s+0%")
    child.expect(r"1/1\s+100%")
    child.expect(rf"{job_id}\s+succeeded")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_wait_for_an_array_counts_its_members_in_the_bar(daemon):
    """wait --array in a terminal counts finished members out of the
    array's size, up to 3/3 100%, and exits 1 when one failed."""
    array_id = submitted(daemon, "--array", "3", "--", "sh", "-c",
                         "sleep $DISPATCHER_ARRAY_INDEX; exit $DISPATCHER_ARRAY_INDEX")
    child = terminal(daemon, "wait", "--array", array_id)
    child.expect(rf"array {array_id}")
    child.expect(r"3/3\s+100%")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1


def test_logs_follow_prints_output_as_it_is_written(daemon):
    """logs -f in a terminal prints each line as the job writes it, while
    the job still runs, and exits 0 when the attempt ends."""
    job_id = submitted(daemon, "--", "sh", "-c",
                       "echo one; sleep 1; echo two; sleep 1; echo three")
    child = terminal(daemon, "logs", "-f", job_id)
    child.expect("one")
    code, job = daemon.request("GET", f"/v1/jobs/{job_id}")
    assert job["state"] == "running"
    child.expect("two")
    child.expect("three")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ls_watch_redraws_when_a_job_changes(daemon):
    """ls --watch in a terminal draws the table, redraws it when a job of
    its filter is submitted and when it finishes, and Ctrl-C ends it with
    status 130."""
    child = terminal(daemon, "ls", "--watch", "--label", "case=watch")
    child.expect("ID")
    child.expect("Ctrl-C ends")
    job_id = submitted(daemon, "--label", "case=watch", "--", "sh", "-c", "sleep 1")
    child.expect(job_id)
    child.expect(rf"{job_id}\s+succeeded")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 or child.signalstatus is not None


# tgkill(2): a signal to one thread of a process.
TGKILL = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine)


@pytest.mark.skipif(TGKILL is None, reason=f"no tgkill number known for {os.uname().machine}")
def test_ls_watch_ends_on_a_ctrl_c_that_reaches_its_events_thread(daemon):
    """A Ctrl-C the kernel hands to the thread that reads the events (any
    thread of the process may take it) still ends ls --watch, though no
    event comes to wake the main thread, where Python raises it."""
    import ctypes

    child = terminal(daemon, "ls", "--watch", "--label", "case=quiet")
    child.expect("Ctrl-C ends")
    threads = []
    deadline = time.monotonic() + 10
    while len(threads) < 2:
        assert time.monotonic() < deadline, "no events thread"
        threads = sorted(int(t) for t in os.listdir(f"/proc/{child.pid}/task"))
        time.sleep(0.05)
    events_thread = [t for t in threads if t != child.pid][0]
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(TGKILL, child.pid, events_thread, signal.SIGINT) == 0
    child.expect(pexpect.EOF, timeout=10)
    child.close()
    assert child.exitstatus == 130 or child.signalstatus is not None


def test_the_cli_package_exports_the_command_group_alone():
    """dispatcher.cli's public surface is the maker of the command group."""
    import dispatcher.cli

    assert dispatcher.cli.__all__ == ["api_commands"]
    group = dispatcher.cli.api_commands()
    assert list(group.commands)[:3] == ["submit", "ls", "show"]
