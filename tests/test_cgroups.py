"""
A job is all its processes, and bounded (issue 16): each command job in
cgroups of its own, the spawner helper a child subreaper, a job's processes
and memory limited, its log cut at [executor] max_log_bytes.  Real
processes in real cgroups; where the host gives no cgroups (or the tests do
not run as root) the tests that need them skip, saying why.
"""

import os
import re
import signal
import stat
import sys
import time

import pytest
import pytest_twisted

from dispatcher.config._ini import ConfigError, parse_config
from dispatcher.execution._cgroups import JOBS_DIRECTORY, JobCgroups
from dispatcher.model._jobs import LOG_STREAMS, log_cut_marker

from .conftest import sleep
from .test_process import RawHelper
from .test_twistd import alive


def _support():
    """
    What this host gives jobs, as the helper would find it: a
    L{JobCgroups} started in this process (which makes and removes its
    directories, and moves nothing), or why there is none.
    """
    if os.geteuid() != 0:
        return None, "needs root: jobs' cgroups are made under this process's own"
    found = JobCgroups("auto", 64)
    line = found.start()
    found.close()
    if found.tracker is None:
        return None, f"this host gives jobs no cgroups: {line}"
    return found, line


SUPPORT, WHY = _support()
needs_cgroups = pytest.mark.skipif(SUPPORT is None, reason=str(WHY))
needs_pids = pytest.mark.skipif(
    SUPPORT is None or SUPPORT.pids is None, reason=f"no pids controller: {WHY}")
needs_memory = pytest.mark.skipif(
    SUPPORT is None or SUPPORT.memory is None, reason=f"no memory controller: {WHY}")
needs_v1_freezer = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.isdir("/sys/fs/cgroup/freezer"),
    reason="no cgroup v1 freezer hierarchy at /sys/fs/cgroup/freezer (or not root)")

# The ways of killing a job's processes this host can be tested with, as
# (mode, max_processes): what the helper picks with a process limit (here,
# a hybrid host, the v1 pids cgroup that limits them, forks stopped first;
# cgroup.kill on a pure v2 host), what it picks without one (cgroup v2's
# cgroup.kill), and the v1 freezer.
MODES = [
    pytest.param(("auto", 64), marks=needs_cgroups, id="auto"),
    pytest.param(("auto", 0), marks=needs_cgroups, id="auto-unlimited"),
    pytest.param(("v1", 0), marks=needs_v1_freezer, id="v1-freezer"),
]

MARKERS = {stream: log_cut_marker(stream, 1000) for stream in LOG_STREAMS}


def settings(mode="auto", max_processes=64, max_log_bytes=0, limit=1000):
    return {
        "cgroups": mode,
        "max_processes": max_processes,
        "max_log_bytes": max_log_bytes,
        "markers": {s: log_cut_marker(s, limit) for s in LOG_STREAMS},
    }


@pytest.fixture
def helper(tmp_path):
    """Start raw spawner helpers with settings; all closed at teardown."""
    made = []

    def start(**kw):
        made.append(RawHelper(tmp_path, settings(**kw)))
        return made[-1]

    yield start
    for one in made:
        one.close()


def wait_for_pid(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        assert time.monotonic() < deadline, f"no pid in {path}"
        time.sleep(0.01)
    return int(path.read_text())


def escapee(pidfile, ignore_term=True):
    """
    A shell line that starts a process in a session of its own (so no
    longer in the job's process group), which ignores SIGTERM and writes
    its pid to C{pidfile}.
    """
    trap = 'trap "" TERM; ' if ignore_term else ""
    return f"setsid sh -c '{trap}echo $$ > {pidfile}; while :; do sleep 1; done' &"


# Finding the process's own cgroups

def test_the_own_cgroups_are_found_from_mountinfo_and_proc_cgroup():
    """A pure cgroup v2 host under systemd (the unit's cgroup), a hybrid
    host, and a container whose mounts show only its part of a hierarchy:
    each hierarchy the helper may use is found at the process's own cgroup,
    and a mount that shows another part is passed over."""
    from dispatcher.execution._cgroups import (
        own_directories,
        parse_mountinfo,
        parse_proc_cgroup,
    )

    pure = own_directories(
        parse_mountinfo(
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 "
            "rw,nsdelegate,memory_recursiveprot\n"
            "24 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"),
        parse_proc_cgroup("0::/system.slice/dispatcher.service\n"))
    assert pure == {"cgroup2": "/sys/fs/cgroup/system.slice/dispatcher.service"}
    hybrid = own_directories(
        parse_mountinfo(
            "31 25 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
            "35 25 0:31 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
            "36 25 0:32 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
            "37 25 0:33 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
            "38 25 0:34 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer\n"),
        parse_proc_cgroup("9:freezer:/\n8:memory:/user.slice\n4:pids:/user.slice/a\n"
                          "2:cpu,cpuacct:/\n0::/user.slice/a\n"))
    assert hybrid == {
        "cgroup2": "/sys/fs/cgroup/unified/user.slice/a",
        "pids": "/sys/fs/cgroup/pids/user.slice/a",
        "memory": "/sys/fs/cgroup/memory/user.slice",
        "freezer": "/sys/fs/cgroup/freezer",
    }
    container = own_directories(
        parse_mountinfo(
            "40 30 0:26 /docker/abc /sys/fs/cgroup ro - cgroup2 cgroup rw\n"
            "41 30 0:26 /other /mnt/other rw - cgroup2 cgroup rw\n"
            "42 30 0:26 /docker/abc/with\\040space /mnt/x rw - cgroup2 cgroup rw\n"),
        parse_proc_cgroup("0::/docker/abc/job\n"))
    assert container == {"cgroup2": "/sys/fs/cgroup/job"}


# The helper: every process of a job dies with it

@pytest.mark.parametrize("mode", MODES)
def test_a_setsid_escapee_dies_when_its_job_exits(helper, tmp_path, mode):
    """A process the job started in a new session, and which outlives the
    job's own exit, is killed before that exit is reported: nothing of the
    job runs once its end is known.  The report comes as soon as it is gone
    (well before the 5 s the helper waits at most for a process that will
    not die)."""
    mode, max_processes = mode
    raw = helper(mode=mode, max_processes=max_processes)
    pidfile = tmp_path / "escapee"
    spawned = raw.spawn(1, ["sh", "-c", escapee(pidfile) + f" while [ ! -s {pidfile} ]; "
                                                   "do sleep 0.01; done"])
    started = time.monotonic()
    assert spawned["limits"] == {
        "memory_mb": None, "processes": max_processes or None, "enforced": True}
    assert raw.exited(1)["code"] == 0
    assert time.monotonic() - started < 3
    pid = int(pidfile.read_text())
    assert not alive(pid)


@pytest.mark.parametrize("mode", MODES)
def test_a_setsid_escapee_dies_when_its_job_is_cancelled(helper, tmp_path, mode):
    """A cancel (SIGTERM to the job) ends the job's leader; its escapee,
    which ignores SIGTERM and is in no group of the job's, is killed with
    the rest of its cgroup before the end is reported."""
    mode, max_processes = mode
    raw = helper(mode=mode, max_processes=max_processes)
    pidfile = tmp_path / "escapee"
    raw.spawn(1, ["sh", "-c", escapee(pidfile) + " wait"])
    pid = wait_for_pid(pidfile)
    raw.send(op="signal", id=1, signal=signal.SIGTERM)
    assert raw.exited(1)["code"] == -signal.SIGTERM
    assert not alive(pid)


@needs_cgroups
def test_a_signal_reaches_every_process_of_a_job_once(helper, tmp_path):
    """A signal for a job (a cancel's SIGTERM) reaches each of its
    processes once: those of its process group, and those that left it."""
    raw = helper()
    heard = tmp_path / "heard"
    pidfile = tmp_path / "escapee"
    raw.spawn(1, ["sh", "-c",
                  f"setsid sh -c 'trap \"echo escapee >> {heard}\" TERM; echo $$ > {pidfile}; "
                  f"while :; do sleep 0.05; done' & "
                  f"trap 'echo leader >> {heard}' TERM; "
                  f"while :; do sleep 0.05; done"])
    wait_for_pid(pidfile)
    raw.send(op="signal", id=1, signal=signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not (heard.exists() and len(heard.read_text().split()) >= 2):
        assert time.monotonic() < deadline, "the signal did not reach both"
        time.sleep(0.02)
    time.sleep(0.3)
    assert sorted(heard.read_text().split()) == ["escapee", "leader"]
    raw.send(op="signal", id=1, signal=signal.SIGKILL)
    assert raw.exited(1)["code"] == -signal.SIGKILL
    assert not alive(int(pidfile.read_text()))


@needs_cgroups
def test_a_double_forked_escapee_dies_at_its_jobs_deadline(helper, tmp_path):
    """At a job's deadline (a remote worker's fence) the helper kills all
    of its cgroup: a double-forked grandchild in a session of its own too."""
    raw = helper()
    pidfile = tmp_path / "escapee"
    raw.spawn(1, ["sh", "-c", f"( {escapee(pidfile)} ) ; wait; sleep 60"],
              deadline=time.clock_gettime(time.CLOCK_BOOTTIME) + 1.0)
    pid = wait_for_pid(pidfile)
    assert alive(pid)
    assert raw.exited(1)["deadline"] is True
    assert not alive(pid)


def cgroups_of(text):
    """
    A C{/proc/PID/cgroup} text as C{{hierarchy: path}}: C{"cgroup2"} for
    the v2 line, each v1 controller for its line.
    """
    found = {}
    for line in text.splitlines():
        number, controllers, path = line.split(":", 2)
        for kind in (["cgroup2"] if number == "0" else controllers.split(",")):
            found[kind] = path
    return found


@needs_cgroups
def test_a_job_is_born_in_its_own_cgroups(helper, tmp_path):
    """The job's first instruction already runs in its own cgroups (the
    helper spawns it from inside them), under the helper's directory in
    each hierarchy; two jobs running at once have cgroups of their own."""
    raw = helper()
    first = raw.spawn(1, ["sleep", "10"])
    raw.spawn(2, ["cat", "/proc/self/cgroup"])
    assert raw.exited(2)["code"] == 0
    second = cgroups_of((tmp_path / "2.out").read_text())
    with open(f"/proc/{first['pid']}/cgroup") as f:
        other = cgroups_of(f.read())
    raw.send(op="signal", id=1, signal=signal.SIGKILL)
    raw.exited(1)
    kinds = {h.kind for h in (SUPPORT.tracker, SUPPORT.pids) if h is not None}
    for kind in kinds:
        assert re.search(
            rf"/{JOBS_DIRECTORY}/helper-{raw.process.pid}-\d+/job-\d+$", second[kind]
        ), (kind, second)
        assert other[kind] != second[kind]


@needs_cgroups
def test_a_job_run_as_another_account_cannot_leave_its_cgroups(helper, tmp_path):
    """A job running as an unprivileged account cannot move itself out of
    its cgroups (as one running as root could), and its escapee dies with
    it all the same; its stdout, a pipe, is its own to open again."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    raw = helper(max_log_bytes=1000)
    home = os.path.join(SUPPORT.tracker.home, "cgroup.procs")
    # In its working directory, its account's (the test's is not open to it).
    pidfile = tmp_path / "work" / "escapee"
    raw.spawn(1, ["sh", "-c",
                  f"(echo $$ > {home}) 2>/dev/null && echo left || echo stayed; "
                  f"echo again > /dev/stdout; "
                  + escapee("escapee") + " while [ ! -s escapee ]; do sleep 0.01; done"],
              cwd=str(tmp_path / "work"),
              run_as={"user": "nobody", "uid": nobody.pw_uid, "gid": nobody.pw_gid,
                      "groups": [nobody.pw_gid]})
    assert raw.exited(1)["code"] == 0
    assert (tmp_path / "1.out").read_text() == "stayed\nagain\n"
    assert not alive(int(pidfile.read_text()))


@needs_pids
def test_a_fork_bomb_is_bounded_by_max_processes(helper, tmp_path):
    """A job that forks without end gets at most [executor] max_processes
    processes (itself included); the forks past it fail, and the job's
    processes all die with it."""
    raw = helper(max_processes=20)
    program = (
        "import os, time\n"
        "children = []\n"
        "try:\n"
        "    while len(children) < 1000:\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        children.append(pid)\n"
        "except OSError as e:\n"
        "    print(len(children), e.strerror, flush=True)\n"
    )
    raw.spawn(1, [sys.executable, "-c", program], stdout=str(tmp_path / "1.out"))
    assert raw.exited(1)["code"] == 0
    count, why = (tmp_path / "1.out").read_text().split(" ", 1)
    # The job and its children, within 20 (the helper, spawning, counted
    # for a moment too).
    assert 10 <= int(count) <= 19
    assert "Resource temporarily unavailable" in why


@needs_cgroups
def test_the_cgroups_a_killed_helper_left_are_cleaned_up(tmp_path):
    """A helper killed with SIGKILL leaves its jobs running in their
    cgroups; the next helper started under the same cgroup kills them and
    removes what the dead one made."""
    dead = RawHelper(tmp_path, settings())
    pidfile = tmp_path / "escapee"
    dead.spawn(1, ["sh", "-c", escapee(pidfile) + " wait"])
    pid = wait_for_pid(pidfile)
    dead.process.kill()
    dead.process.wait()
    dead.process.stdin.close()
    dead.process.stdout.close()
    assert alive(pid)
    tracker = SUPPORT.tracker
    left = os.path.join(os.path.dirname(tracker.jobs), f"helper-{dead.process.pid}-")
    assert any(os.path.join(os.path.dirname(tracker.jobs), n).startswith(left)
               for n in os.listdir(os.path.dirname(tracker.jobs)))
    fresh = RawHelper(tmp_path, settings())
    try:
        assert not alive(pid)
        assert not any(os.path.join(os.path.dirname(tracker.jobs), n).startswith(left)
                       for n in os.listdir(os.path.dirname(tracker.jobs)))
    finally:
        fresh.close()


def test_without_cgroups_the_helper_says_so_and_reaps_orphans(helper, tmp_path):
    """With cgroups off a job's limits are reported as not enforced; the
    helper, a child subreaper, becomes the parent of a job's orphan and
    reaps it when it exits, without reporting it as a job."""
    raw = helper(mode="off")
    assert "not put in cgroups" in raw.ready["description"]
    assert "child subreaper" in raw.ready["description"]
    pidfile = tmp_path / "orphan"
    spawned = raw.spawn(1, ["sh", "-c", f"(setsid sh -c 'echo $$ > {pidfile}; sleep 0.5' &); "
                                        f"while [ ! -s {pidfile} ]; do sleep 0.01; done"])
    assert spawned["limits"]["enforced"] is False
    assert raw.exited(1)["code"] == 0
    pid = wait_for_pid(pidfile)
    assert int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) == (
        raw.process.pid)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, "the orphan was not reaped"
        time.sleep(0.02)
    raw.spawn(2, ["true"])
    assert raw.exited(2)["code"] == 0
    assert [r for r in raw.replies if r["op"] == "exited"] == []


# The log cap

def test_a_stream_past_the_cap_is_cut_with_a_marker(helper, tmp_path):
    """Past max_log_bytes a stream is read and dropped: the file keeps the
    first bytes and a marker line, the other stream is whole, and the end
    says which stream was cut; a stream of exactly the limit is not cut."""
    raw = helper(max_log_bytes=1000)
    raw.spawn(1, ["sh", "-c", "head -c 5000 /dev/zero | tr '\\000' a; echo oops >&2"])
    assert raw.exited(1) == {"op": "exited", "id": 1, "code": 0, "cut": ["stdout"]}
    out = (tmp_path / "1.out").read_bytes()
    assert out == b"a" * 1000 + b"\n" + MARKERS["stdout"].encode()
    assert (tmp_path / "1.err").read_text() == "oops\n"
    raw.spawn(2, ["sh", "-c", "head -c 1000 /dev/zero"])
    assert "cut" not in raw.exited(2)
    assert os.path.getsize(tmp_path / "2.out") == 1000


def test_a_log_file_that_has_output_is_written_on_from_its_end(helper, tmp_path):
    """Output already in a log file is kept, and counts against the cap."""
    raw = helper(max_log_bytes=1000)
    (tmp_path / "1.out").write_text("x" * 990)
    raw.spawn(1, ["echo", "0123456789abc"])
    assert raw.exited(1)["cut"] == ["stdout"]
    assert (tmp_path / "1.out").read_text() == (
        "x" * 990 + "0123456789\n" + MARKERS["stdout"])


def test_a_stream_gets_its_file_at_its_first_byte(helper, tmp_path):
    """A capped stream's file is made when its first byte arrives, 0600:
    a quiet job leaves none, a job writing only to stderr no stdout file,
    and a stream that ends without a byte costs no file even when the job
    lingers."""
    raw = helper(max_log_bytes=1000)
    raw.spawn(1, ["true"])
    assert raw.exited(1) == {"op": "exited", "id": 1, "code": 0}
    assert not (tmp_path / "1.out").exists() and not (tmp_path / "1.err").exists()
    raw.spawn(2, ["sh", "-c", "exec >&-; sleep 0.3; echo late >&2"])
    assert raw.exited(2)["code"] == 0
    assert not (tmp_path / "2.out").exists()
    assert (tmp_path / "2.err").read_text() == "late\n"
    assert stat.S_IMODE(os.stat(tmp_path / "2.err").st_mode) == 0o600
    # A link planted where a file is not yet made is refused at spawn.
    os.symlink("/etc/hostname", tmp_path / "3.err")
    raw.send(**raw.spawn_request(3, ["true"]))
    reply = raw.reply(lambda r: r["id"] == 3)
    assert reply["op"] == "error" and "symbolic link" in reply["error"], reply


def test_a_job_writing_a_gigabyte_neither_fills_the_disk_nor_blocks(helper, tmp_path):
    """A job writing 1 GiB to a stream capped at 1 MiB runs to its end at
    the speed the helper drops it, and its file holds 1 MiB and a marker."""
    raw = helper(max_log_bytes=1 << 20, limit=1 << 20)
    started = time.monotonic()
    raw.spawn(1, ["head", "-c", str(1 << 30), "/dev/zero"])
    ended = raw.exited(1, timeout=60)
    assert ended["code"] == 0 and ended["cut"] == ["stdout"]
    assert time.monotonic() - started < 60
    marker = log_cut_marker("stdout", 1 << 20).encode()
    assert os.path.getsize(tmp_path / "1.out") == (1 << 20) + 1 + len(marker)


# The daemon: limits enforced and recorded

@needs_memory
@pytest_twisted.ensureDeferred
async def test_a_job_over_its_memory_is_killed_and_its_record_says_why(make_daemon):
    """A job that asks for 64 MiB and allocates 512 is killed by the OOM
    killer; its record says it ran out of memory, and under what limits."""
    daemon = await make_daemon("[executor]\nmax_processes = 100\n")
    job = await daemon.submit({
        "command": [sys.executable, "-c", "x = bytearray(512 << 20); print(len(x))"],
        "resources": {"memory_mb": 64},
    })
    done = await daemon.wait(job["id"])
    assert done["state"] == "failed"
    assert done["exit_code"] == -signal.SIGKILL
    assert done["error"].startswith("out of memory: the OOM killer killed 1 of its "
                                    "processes, over its memory limit of 64 MiB")
    assert done["attempts"][0]["limits"] == {
        "memory_mb": 64, "processes": 100, "enforced": True}


@needs_cgroups
@pytest_twisted.ensureDeferred
async def test_a_timed_out_job_leaves_no_process(make_daemon, tmp_path):
    """At a job's timeout every process of it is killed, its escapee that
    ignores SIGTERM too (after the kill grace), and the record says the
    limits held."""
    daemon = await make_daemon("[executor]\nkill_grace = 0.2\n")
    pidfile = tmp_path / "escapee"
    job = await daemon.submit({
        "command": ["sh", "-c", escapee(pidfile) + " trap '' TERM; wait; sleep 60"],
        "timeout": 1,
    })
    done = await daemon.wait(job["id"])
    assert done["error"] == "timed out after 1 s"
    assert not alive(int(pidfile.read_text()))
    assert done["attempts"][0]["limits"] == {
        "memory_mb": None, "processes": 4096, "enforced": True}


@needs_cgroups
@pytest_twisted.ensureDeferred
async def test_a_cancelled_job_leaves_no_process(daemon, tmp_path):
    """A cancelled job's escapee, in a session of its own and deaf to
    SIGTERM, is gone once the job is cancelled."""
    pidfile = tmp_path / "escapee"
    job = await daemon.submit({"command": ["sh", "-c", escapee(pidfile) + " wait"]})
    await daemon.wait(job["id"], ("running",))
    while not (pidfile.exists() and pidfile.read_text().endswith("\n")):
        await sleep(0.01)
    code, _ = await daemon.json("POST", f"/v1/jobs/{job['id']}/cancel")
    assert code == 202
    done = await daemon.wait(job["id"])
    assert done["state"] == "cancelled"
    assert not alive(int(pidfile.read_text()))


@pytest_twisted.ensureDeferred
async def test_a_job_printing_past_the_cap_has_a_cut_log(make_daemon):
    """A command's stream past [executor] max_log_bytes is cut: its log
    ends with the marker, and its attempt names the stream cut."""
    daemon = await make_daemon("[executor]\nmax_log_bytes = 1000\n")
    job = await daemon.submit({"command": ["sh", "-c", "seq 1 2000"]})
    done = await daemon.wait(job["id"])
    assert done["state"] == "succeeded"
    assert done["attempts"][0]["log_cut"] == ["stdout"]
    response, body = await daemon.request("GET", f"/v1/jobs/{job['id']}/log")
    assert response.code == 200
    text = body.decode()
    assert len(text) == 1000 + len(MARKERS["stdout"]) + (not text[:1000].endswith("\n"))
    assert text.endswith(MARKERS["stdout"])
    quiet = await daemon.submit({"command": ["echo", "hi"]})
    assert (await daemon.wait(quiet["id"]))["attempts"][0]["log_cut"] == []


@pytest_twisted.ensureDeferred
async def test_the_spawner_says_once_what_holds_for_jobs(make_daemon):
    """The spawner tells, once the helper has started, what holds for jobs:
    here, that each gets cgroups of its own (or why not)."""
    daemon = await make_daemon()
    spawner = daemon.service.spawner
    while spawner.description is None:
        await sleep(0.01)
    if SUPPORT is None:
        assert "not put in cgroups" in spawner.description
    else:
        assert spawner.description.startswith("each job gets cgroups of its own")
    assert "child subreaper" in spawner.description


def test_the_limits_keys_are_checked():
    """max_processes is 0 or at least 2, max_log_bytes at least 0, and
    cgroups auto or off; anything else is one line naming the key."""
    config = parse_config(
        "[executor]\nmax_processes = 0\nmax_log_bytes = 0\ncgroups = off\n")
    assert (config.executor.max_processes, config.executor.max_log_bytes,
            config.executor.cgroups) == (0, 0, "off")
    for key, value, allowed in (
        ("max_processes", "1", "expected 0 (no limit) or an integer of at least 2"),
        ("max_log_bytes", "-1", "expected an integer of at least 0"),
        ("cgroups", "v2", "expected auto (cgroups where the host allows them) or off"),
    ):
        with pytest.raises(ConfigError) as e:
            parse_config(f"[executor]\n{key} = {value}\n", "x.ini")
        assert str(e.value) == f"x.ini: [executor] {key} = {value!r}: {allowed}"


# Remote workers: the cap holds on both sides, and the record says so

SEQ_3000 = "".join(f"{i}\n" for i in range(1, 3001))


def cut_at(text, limit):
    """What a log of C{text} holds, cut at C{limit} bytes."""
    kept = text[:limit]
    return kept + ("" if kept.endswith("\n") else "\n") + log_cut_marker("stdout", limit)

def test_a_remote_workers_job_says_its_limits_and_its_cut_log(tmp_path, token_file):
    """A worker caps its job's log at its own max_log_bytes and reports the
    cut and its limits with the result; the dispatcher also caps what a
    worker sends at its own max_log_bytes, with its marker, and records the
    cut.  The dispatcher's start-up log says what holds for its jobs."""
    from .test_remote import poll
    from .test_twistd import Twistd
    from .test_worker import WorkerProcess

    dispatcher = Twistd(
        str(tmp_path),
        f"[executor]\nslots = 0\nmax_log_bytes = 2000\n\n"
        f"[workers]\ntoken_file = {token_file}\n")
    dispatcher.start()
    workers = [
        WorkerProcess(tmp_path, dispatcher.url, token_file, slots=1, name=name,
                      ini=f"[executor]\nmax_log_bytes = {cap}\nmax_processes = 50\n")
        for name, cap in (("capped", 500), ("uncapped", 0))
    ]
    for worker in workers:
        worker.args += ["--label", f"name={worker.name}"]
        worker.start()
    try:
        jobs = {}
        for worker in workers:
            code, job = dispatcher.request("POST", "/v1/jobs", {
                "command": ["seq", "1", "3000"], "requirements": {"name": worker.name}})
            assert code == 201, job
            jobs[worker.name] = job["id"]
        done = {name: dispatcher.wait(job_id, ("succeeded", "failed"), timeout=30)
                for name, job_id in jobs.items()}
        for name, job in done.items():
            assert job["state"] == "succeeded", (job, workers[0].output())
            attempt = job["attempts"][0]
            assert attempt["log_cut"] == ["stdout"]
            assert attempt["limits"] == {
                "memory_mb": None, "processes": 50, "enforced": SUPPORT is not None}
        logs = {}
        for name, job_id in jobs.items():
            path = poll(lambda: [p for p in (tmp_path / "data" / "jobs").rglob(
                f"{job_id}/attempt-1/stdout")], what="the log")[0]
            logs[name] = path.read_text()
        # Cut by its worker at 500 bytes, and shipped whole; cut by the
        # dispatcher at 2000.
        assert logs["capped"] == cut_at(SEQ_3000, 500)
        assert logs["uncapped"] == cut_at(SEQ_3000, 2000)
        started = open(os.path.join(dispatcher.workdir, "out.log")).read()
        assert "process spawner: " in started
    finally:
        for worker in workers:
            worker.kill()
        dispatcher.stop()


@pytest_twisted.ensureDeferred
async def test_the_served_document_declares_an_attempts_limits(make_daemon):
    """The OpenAPI document declares an attempt's limits and cut streams
    once, and a command job as served, with both set, is valid against it."""
    import jsonschema

    daemon = await make_daemon("[executor]\nmax_log_bytes = 10\n")
    code, doc = await daemon.json("GET", "/v1/openapi.json")
    assert code == 200
    schemas = doc["components"]["schemas"]
    attempt = schemas["AttemptView"]["properties"]
    assert attempt["limits"]["anyOf"][0] == {"$ref": "#/components/schemas/Limits"}
    assert schemas["ResultItem"]["properties"]["limits"]["$ref"] == (
        "#/components/schemas/Limits")
    assert set(schemas["Limits"]["required"]) == {"memory_mb", "processes", "enforced"}
    job = await daemon.submit({"command": ["seq", "100"]})
    done = await daemon.wait(job["id"])
    assert done["attempts"][0]["log_cut"] == ["stdout"]
    assert done["attempts"][0]["limits"]["processes"] == 4096
    jsonschema.validate(done, {"$ref": "#/components/schemas/JobView",
                               "components": doc["components"]})


def test_the_dispatcher_cuts_what_a_worker_sends_once(tmp_path):
    """What a worker sends past the dispatcher's max_log_bytes is dropped
    and the marker written once at the limit, whatever the chunks: one
    crossing the limit, one sent again from below it, one wholly past it;
    the size answered counts what was dropped, so the worker sends on from
    there."""
    from dispatcher.api._workers import _write_at
    from dispatcher.execution._executor import LocalExecutor

    def write(path, offset, data):
        return _write_at(path, offset, data, LocalExecutor.open_log, 10, marker)

    path = str(tmp_path / "attempt-1" / "stdout")
    marker = log_cut_marker("stdout", 10)
    assert write(path, 0, b"01234") == (5, False)
    assert write(path, 5, b"56789abc") == (13, True)
    assert write(path, 13, b"def") == (16, True)
    assert write(path, 5, b"56789abc") == (13, True)
    assert open(path).read() == "0123456789\n" + marker
    # Below the limit, a gap is still refused: the worker must send from
    # the end.
    other = str(tmp_path / "attempt-1" / "stderr")
    assert write(other, 3, b"x") is None
