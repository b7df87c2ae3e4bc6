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
import socket
import subprocess
import sys
import time

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
