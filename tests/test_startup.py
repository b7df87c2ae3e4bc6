"""
A start that fails, with a real twistd (or twist): it exits non-zero at
once, with one line naming the cause and the file or address; and a store
that lost acknowledged commits is found, checked, and restored with the
operator's command.
"""

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from tests.test_twistd import BIN, ROOT, Twistd

ENV = dict(os.environ, PYTHONPATH=ROOT)


def run_daemon(workdir, data_dir, listen="tcp:0:interface=127.0.0.1", ini="",
               program="twistd"):
    """Run a daemon that is expected not to start: its exit status, its
    output and the seconds it ran."""
    config = os.path.join(workdir, "fail.ini")
    with open(config, "w") as f:
        f.write(ini)
    args = [os.path.join(BIN, program)]
    args += (["-n", "--pidfile", ""] if program == "twistd" else ["--log-format", "text"])
    args += ["dispatcher", "--config", config, "--listen", listen, "--data-dir", data_dir]
    started = time.monotonic()
    result = subprocess.run(args, cwd=workdir, env=ENV, capture_output=True, text=True,
                            timeout=60)
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


def one_line(output, *words):
    """The one line saying the start failed; it names every one of words."""
    lines = [line for line in output.splitlines() if "could not start" in line]
    assert len(lines) == 1, output
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in output
    return lines[0]


def store_command(*args):
    return subprocess.run([os.path.join(BIN, "dispatcher"), "store", *args], env=ENV,
                          capture_output=True, text=True, timeout=60)


# A real twistd takes about half a second to import and start; the failure
# and the stop after it must add little to that.
QUICK = 3.0


@pytest.fixture
def mounts():
    made = []
    yield made
    for path in made:
        subprocess.run(["umount", path], check=False)


@pytest.mark.parametrize("program", ["twistd", "twist"])
def test_a_taken_port_exits_nonzero_naming_the_address(tmp_path, program):
    """A port another process listens on: exit 1 at once, one line naming the
    address, and nothing of the store touched."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        code, output, seconds = run_daemon(
            str(tmp_path), str(tmp_path / "data"),
            listen=f"tcp:{port}:interface=127.0.0.1", program=program)
    finally:
        taken.close()
    assert code == 1 and seconds < QUICK, (code, seconds, output)
    one_line(output, f"cannot listen on 127.0.0.1:{port}", "Address already in use")
    assert not (tmp_path / "data" / "dispatcher.sqlite3").exists()


def test_a_data_directory_in_use_exits_nonzero(tmp_path):
    """A second daemon on a data directory another one holds: exit 1 at once,
    one line naming the directory and the other's pid."""
    first = Twistd(str(tmp_path))
    first.start()
    try:
        data = str(tmp_path / "data")
        code, output, seconds = run_daemon(str(tmp_path), data)
        assert code == 1 and seconds < QUICK, (code, seconds, output)
        one_line(output, f"the data directory {data} is in use",
                 f"pid {first.process.pid}")
    finally:
        first.stop()


def test_a_data_directory_that_is_a_file_exits_nonzero(tmp_path):
    """A data directory that is a file: exit 1 at once, one line saying so."""
    data = tmp_path / "data"
    data.write_text("not a directory")
    code, output, seconds = run_daemon(str(tmp_path), str(data))
    assert code == 1 and seconds < QUICK, (code, seconds, output)
    one_line(output, f"{data} is not a directory")


@pytest.mark.parametrize("inside", [False, True])
def test_a_read_only_data_directory_exits_nonzero(tmp_path, mounts, inside):
    """A data directory on a read-only file system (root may write anywhere
    else), or to be made inside one: exit 1 at once, one line naming the
    file that could not be written."""
    readonly = tmp_path / "ro"
    readonly.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(readonly)],
                   check=True)
    mounts.append(str(readonly))
    data = readonly / "data" if inside else readonly
    code, output, seconds = run_daemon(str(tmp_path), str(data))
    assert code == 1 and seconds < QUICK, (code, seconds, output)
    named = data if inside else data / "lock"
    one_line(output, f"the data directory {data} cannot be used",
             f"{named}: Read-only file system")


def test_a_file_that_is_not_a_database_exits_nonzero(tmp_path):
    """A database file that is not a database: exit 1 at once, one line
    naming the file and saying to restore a backup."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "dispatcher.sqlite3").write_bytes(os.urandom(64 * 1024))
    code, output, seconds = run_daemon(str(tmp_path), str(data))
    assert code == 1 and seconds < QUICK, (code, seconds, output)
    one_line(output, f"the store {data / 'dispatcher.sqlite3'} is damaged",
             "dispatcher store restore")


def test_a_damaged_database_exits_nonzero(tmp_path):
    """64 flipped bytes in the middle of a database a daemon wrote: the next
    start exits 1 with one line naming the file, and the check says so too."""
    daemon = Twistd(str(tmp_path), "[executor]\nslots = 0\n")
    daemon.start()
    for i in range(300):
        code, _ = daemon.request("POST", "/v1/jobs", {"command": ["true"],
                                                      "labels": {"i": str(i)}})
        assert code == 201
    daemon.stop_gracefully()
    path = tmp_path / "data" / "dispatcher.sqlite3"
    middle = path.stat().st_size // 4096 // 2 * 4096
    with open(path, "r+b") as f:
        f.seek(middle)
        data = f.read(64)
        f.seek(middle)
        f.write(bytes(b ^ 0xFF for b in data))
    code, output, seconds = run_daemon(str(tmp_path), str(tmp_path / "data"))
    assert code == 1 and seconds < QUICK, (code, seconds, output)
    one_line(output, f"the store {path} is damaged")
    checked = store_command("check", "--data-dir", str(tmp_path / "data"))
    assert checked.returncode == 1
    assert f"the store {path} is damaged" in checked.stderr


@pytest.mark.parametrize("program", ["twistd", "twist"])
def test_refusing_to_listen_beyond_loopback_exits_without_running_jobs(
        tmp_path, program):
    """With authentication off, an address the options cannot tell
    (interface=0 binds every interface) is refused once bound: exit 1 at
    once, one line naming it, and a job the last run left queued did not
    start."""
    daemon = Twistd(str(tmp_path), "[executor]\nslots = 0\n[api]\nauthentication = off\n")
    daemon.start()
    code, job = daemon.request("POST", "/v1/jobs", {"command": ["sleep", "300"]})
    assert code == 201
    daemon.stop_gracefully()
    code, output, seconds = run_daemon(
        str(tmp_path), str(tmp_path / "data"), listen="tcp:0:interface=0",
        ini="[executor]\nslots = 2\n[api]\nauthentication = off\n", program=program)
    assert code == 1 and seconds < QUICK, (code, seconds, output)
    one_line(output, "the API would listen on 0.0.0.0", "authentication = off")
    again = Twistd(str(tmp_path), "[executor]\nslots = 0\n[api]\nauthentication = off\n")
    again.start()
    try:
        code, after = again.request("GET", f"/v1/jobs/{job['id']}")
        assert after["state"] == "queued" and after["attempts"] == []
    finally:
        again.stop()


def flip_wal_frame(path, frame, count=8):
    """Flip count bytes inside the page of the write-ahead log's frame
    (from 1): SQLite's recovery stops at the first frame whose checksum
    fails, dropping it and every frame after it."""
    with open(path, "rb") as f:
        header = f.read(32)
    page_size = int.from_bytes(header[8:12], "big")
    offset = 32 + (frame - 1) * (24 + page_size) + 24 + page_size // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def test_a_log_that_lost_acknowledged_jobs_is_found_and_restored(tmp_path):
    """100 acknowledged jobs, kill -9, 8 flipped bytes in frame 10 of the
    write-ahead log: the restart exits 1 at once with one line saying how
    many commits are gone; the check says the same; restoring the backup
    taken while the daemon ran brings the daemon back with that backup's
    jobs."""
    data = tmp_path / "data"
    path = data / "dispatcher.sqlite3"
    daemon = Twistd(str(tmp_path), "[executor]\nslots = 0\n")
    daemon.start()
    before = []
    for i in range(10):
        code, job = daemon.request("POST", "/v1/jobs", {"command": ["true"]})
        assert code == 201
        before.append(job["id"])
    backup = tmp_path / "backup.sqlite3"
    made = store_command("backup", str(backup), "--data-dir", str(data))
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith(f"{backup}: ok, 10 jobs")
    refused = store_command("restore", str(backup), "--data-dir", str(data))
    assert refused.returncode == 1
    assert f"is in use by a dispatcher (pid {daemon.process.pid})" in refused.stderr
    for i in range(100):
        code, job = daemon.request("POST", "/v1/jobs", {"command": ["true"]})
        assert code == 201
    assert daemon.kill(signal.SIGKILL) == -signal.SIGKILL
    kept = tmp_path / "kept"
    shutil.copytree(data, kept)
    flip_wal_frame(str(path) + "-wal", 10)

    code, output, seconds = run_daemon(str(tmp_path), str(data))
    assert code == 1 and seconds < QUICK, (code, seconds, output)
    line = one_line(output, f"the store {path} lost ", "acknowledged commits",
                    "dispatcher store restore")
    lost = int(line.split(" lost ")[1].split()[0])
    assert lost >= 100
    checked = store_command("check", "--data-dir", str(data))
    assert checked.returncode == 1
    assert checked.stderr.strip().endswith(line.split("could not start: ")[1])
    # Undamaged, the same files are whole: the loss was the frame's.
    assert store_command("check", "--data-dir", str(kept)).returncode == 0

    restored = store_command("restore", str(backup), "--data-dir", str(data))
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.startswith(f"{path}: ok, 10 jobs")
    daemon = Twistd(str(tmp_path), "[executor]\nslots = 0\n")
    daemon.start()
    try:
        for job_id in before:
            code, job = daemon.request("GET", f"/v1/jobs/{job_id}")
            assert code == 200 and job["state"] == "queued"
    finally:
        daemon.stop()
