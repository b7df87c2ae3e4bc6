"""
Reading the ini file: defaults, every key, and errors that name the file,
section, key and value.
"""

import os
import re

import pytest

from dispatcher.config._ini import Config, ConfigError, load_config, parse_config


def test_defaults():
    """With no file, the daemon listens on loopback 8080 and keeps data in var."""
    config = Config()
    assert config.server.listen == "tcp:8080:interface=127.0.0.1:backlog=4096"
    assert config.dispatcher.data_dir == "var"
    assert config.executor.slots == 8


def test_example_file_holds_the_defaults():
    """etc/dispatcher.ini, uncommented, names every key with its default."""
    lines = []
    for line in open("etc/dispatcher.ini"):
        if re.match(r"^# [a-z_]+ =( |$)", line) and "wordcount" not in line:
            lines.append(line[2:])
        elif line.startswith("[") or line.startswith("# [queue:"):
            lines.append(line.lstrip("# "))
    config = parse_config("".join(lines), "example")
    assert config == Config(path="example")
    # And every key of every section is in the example.
    from dispatcher.config._ini import _QUEUE_KEYS, _SECTIONS
    text = "".join(lines)
    for section, (_, keys) in _SECTIONS.items():
        for key in keys:
            assert f"{key} =" in text, (section, key)
    for key in _QUEUE_KEYS:
        assert f"{key} = " in text, key
    from dispatcher.config._ini import _QUOTA_KEYS
    for key in _QUOTA_KEYS:
        assert f"\n{key} = " in text[text.index("[quota]"):], key


def test_values_are_read():
    """Every section's keys are parsed into the frozen value."""
    config = parse_config(
        "[server]\nlisten = tcp:9000\nmax_body_bytes = 4096\naccess_log = no\n"
        "[dispatcher]\ndata_dir = /tmp/x\nshutdown_grace = 2.5\nsync_interval = 0\n"
        "[executor]\nslots = 0\nthreads = 3\n"
        "[fetch]\ntimeout = 10\nretries = 0\nretry_delay = 0.5\nmax_bytes = 100\n"
        "[tasks]\nadd = tests.tasks:add\n",
        "x.ini",
    )
    assert config.server.listen == "tcp:9000:backlog=4096"
    assert config.server.max_body_bytes == 4096
    assert config.server.access_log is False
    assert config.dispatcher.shutdown_grace == 2.5
    assert config.dispatcher.sync_interval == 0
    assert config.executor.slots == 0 and config.executor.threads == 3
    assert config.fetch.max_bytes == 100 and config.fetch.retry_delay == 0.5
    assert config.tasks["add"].function(None, 1, 2) == 3


def test_listen_gets_a_backlog_unless_it_names_one():
    """An endpoint that takes a backlog and names none gets 4096, from the
    file and from --listen alike; one that names it, or another kind of
    endpoint, is left as given."""
    from dispatcher.app.tap import Options

    assert parse_config("[server]\nlisten = unix:/tmp/d.sock\n").server.listen == (
        "unix:/tmp/d.sock:mode=600:backlog=4096")
    assert parse_config("[server]\nlisten = unix:/tmp/d.sock:mode=660\n").server.listen == (
        "unix:/tmp/d.sock:mode=660:backlog=4096")
    given = "tcp:9000:interface=127.0.0.1:backlog=64"
    assert parse_config(f"[server]\nlisten = {given}\n").server.listen == given
    assert parse_config("[server]\nlisten = systemd:domain=INET:index=0\n").server.listen == (
        "systemd:domain=INET:index=0")
    options = Options()
    options.parseOptions(["--listen", "tcp6:9000:interface=\\:\\:1"])
    assert options.config.server.listen == "tcp6:9000:interface=\\:\\:1:backlog=4096"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[executor]\nslots = many\n",
         "x.ini: [executor] slots = 'many': expected an integer of at least 0"),
        ("[executor]\nthreads = 0\n",
         "x.ini: [executor] threads = '0': expected an integer of at least 1"),
        ("[executor]\ncolour = red\n",
         "x.ini: [executor] colour = 'red': unknown key; known: slots, threads"),
        ("[nope]\na = b\n", "x.ini: [nope]: unknown section; known:"),
        ("[server]\naccess_log = maybe\n",
         "x.ini: [server] access_log = 'maybe': expected one of"),
        ("[dispatcher]\nsync_interval = -1\n",
         "x.ini: [dispatcher] sync_interval = '-1': expected a number of seconds of at least 0"),
        ("[dispatcher]\ngc_freeze = maybe\n",
         "x.ini: [dispatcher] gc_freeze = 'maybe': expected one of"),
        ("[server]\nbody_timeout = abc\n",
         "x.ini: [server] body_timeout = 'abc': expected a number of seconds above 0"),
        ("[fetch]\ntimeout = 0\n",
         "x.ini: [fetch] timeout = '0': expected a number of seconds above 0"),
        ("[workers]\nfence_margin = 0\n",
         "x.ini: [workers] fence_margin = '0': expected a number of seconds above 0"),
        ("[workers]\nlease_seconds = 6\nfence_margin = 4\n",
         "x.ini: [workers] fence_margin = '4': expected a number of seconds above 0 "
         "and below 4 (two thirds of lease_seconds = 6"),
        ("[workers]\nfence_margin = 25\n",
         "x.ini: [workers] fence_margin = '25': expected a number of seconds above 0 "
         "and below 20"),
        ("[tasks]\nx = not a target\n",
         "x.ini: [tasks] x = 'not a target': expected package.module:function"),
        ("[tasks]\nx = no_such_module_xyz:f\n",
         "x.ini: [tasks] x = 'no_such_module_xyz:f': cannot load it (ModuleNotFoundError"),
        ("[tasks]\nx = tests.tasks:missing\n",
         "x.ini: [tasks] x = 'tests.tasks:missing': cannot load it (AttributeError"),
        ("[executor]\nslots = 1\nslots = 2\n", "x.ini: While reading from 'x.ini'"),
        ("slots = 1\n", "x.ini: File contains no section headers."),
    ],
)
def test_errors_name_the_place(text, message):
    """A wrong section, key or value is one line naming file, section, key and
    value, and what is allowed."""
    with pytest.raises(ConfigError) as e:
        parse_config(text, "x.ini")
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_fence_margin_is_read_or_left_to_the_dispatcher():
    """[workers] fence_margin is read in seconds; left out or empty, it is
    None and the dispatcher's default for the lease applies."""
    from dispatcher.model._workers import default_fence_margin

    assert parse_config("[workers]\nfence_margin = 1.5\n").workers.fence_margin == 1.5
    assert parse_config("[workers]\nfence_margin =\n").workers.fence_margin is None
    assert Config().workers.fence_margin is None
    assert default_fence_margin(30) == 6.0
    assert default_fence_margin(60) == 12.0
    assert default_fence_margin(4) == pytest.approx(4 / 3)
    assert default_fence_margin(9) == 2.0


def test_last_attempt_grace_is_read_or_left_to_the_dispatcher():
    """[workers] last_attempt_grace is read in seconds, 0 included (no
    wait); left out, the dispatcher waits a minute or two leases; a
    negative value stops start-up naming the key."""
    from dispatcher.model._workers import default_last_attempt_grace

    assert parse_config("[workers]\nlast_attempt_grace = 0\n").workers.last_attempt_grace == 0
    assert parse_config("[workers]\nlast_attempt_grace = 90\n").workers.last_attempt_grace == 90
    assert Config().workers.last_attempt_grace is None
    assert default_last_attempt_grace(30) == 60.0
    assert default_last_attempt_grace(45) == 90.0
    with pytest.raises(ConfigError, match=r"\[workers\] last_attempt_grace = '-1'"):
        parse_config("[workers]\nlast_attempt_grace = -1\n")


def test_missing_file(tmp_path):
    """A file that cannot be read is an error naming it."""
    with pytest.raises(ConfigError, match="nope.ini: cannot read"):
        load_config(str(tmp_path / "nope.ini"))


def test_tasks_path_adds_directories_after_the_import_path(tmp_path):
    """[tasks] path names directories of task modules, relative to the
    configuration file: they go at the end of sys.path before the tasks
    load, so a task module there loads and a module there named as one the
    daemon uses (json) does not stand in for it; a path that is not a
    directory stops start-up naming it."""
    import json
    import sys

    code = tmp_path / "conf" / "my_tasks"
    code.mkdir(parents=True)
    (code / "readme_path_tasks.py").write_text("def double(context, x):\n    return 2 * x\n")
    (code / "json.py").write_text("raise RuntimeError('not the real json')\n")
    ini = tmp_path / "conf" / "d.ini"
    ini.write_text("[tasks]\ndouble = readme_path_tasks:double\npath = my_tasks\n")
    try:
        config = load_config(str(ini))
        assert config.task_path == (str(code),)
        assert config.tasks["double"].function(None, 21) == 42
        # The standard library's directory comes first: json stays its own.
        stdlib = os.path.dirname(os.path.dirname(json.__file__))
        assert sys.path.index(str(code)) > sys.path.index(stdlib)
        assert sys.path[-1] == str(code)
        assert "path" not in config.tasks
    finally:
        sys.path.remove(str(code))
    with pytest.raises(ConfigError) as e:
        parse_config("[tasks]\npath = nowhere\n", str(tmp_path / "x.ini"))
    assert str(e.value).startswith(
        f"{tmp_path}/x.ini: [tasks] path = 'nowhere': {tmp_path}/nowhere is not a directory")


def test_the_shipped_configuration_loads_its_example_task():
    """etc/dispatcher.ini configures the README's example task, from
    etc/tasks, wherever the daemon starts."""
    config = load_config(os.path.abspath("etc/dispatcher.ini"))
    assert set(config.tasks) == {"wordcount"}
    assert config.task_path == (os.path.abspath("etc/tasks"),)
