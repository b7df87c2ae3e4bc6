"""
A full disk and a failing one: the store's data directory on a small
tmpfs mount that the test fills (the tests run as root, CI too), and a
sync, a lock and a checkpoint made to fail.  Writes are refused with
StorageFull (the API's 507) and logged once a minute with how many failed,
the sync loop outlives its failures, a long wait for the database's write
lock is logged, and nothing acknowledged is lost once the disk has room.
"""

import errno
import os
import sqlite3
import subprocess

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from dispatcher.model._jobs import Offer
from dispatcher.store._results import StorageFull
from dispatcher.store._sqlite import SQLiteJobStore
from tests.store_contract import ids, spec, submit

from .conftest import sleep, until


class SmallDisk:
    """A tmpfs mount of a few MiB that fill() fills and free() empties."""

    def __init__(self, path):
        self.path = path
        self._ballast = path / "ballast"

    def fill(self):
        """Write a file until the file system takes no more."""
        fd = os.open(self._ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 20, 1 << 12, 1):
                chunk = b"\0" * size
                try:
                    while True:
                        os.write(fd, chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)

    def free(self):
        os.unlink(self._ballast)


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs mounted for the test, unmounted after it."""
    path = tmp_path / "disk"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], check=True)
    yield SmallDisk(path)
    subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
def logged():
    """Every event logged during the test, as (level, text)."""
    events = []

    def observe(event):
        events.append((event.get("log_level"), formatEvent(event), event))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def lines(events, text):
    return [line for level, line, _ in events if text in line]


async def refused(d):
    """The failure a write fails with (it must fail)."""
    failures = []
    await d.addCallbacks(lambda v: pytest.fail(f"written: {v!r}"), failures.append)
    return failures[0]


@pytest_twisted.ensureDeferred
async def test_a_full_disk_fails_writes_and_checkpoints_logged_once_a_minute(
        small_disk, logged):
    """On a full disk every write fails with StorageFull (nothing stored), and
    the log gets one line for it, then one a minute saying how many failed
    meanwhile; the sync loop's checkpoint fails, is said once, and is tried
    again each turn; once the disk has room, writes commit and checkpoints
    work again (each said once), and every acknowledged job is there."""
    clock = Clock()
    store = SQLiteJobStore(str(small_disk.path / "db.sqlite3"), reactor, clock=clock)
    await store.open()
    try:
        # Checkpoint at every turn, as past WAL_WATCH.
        store._writer.wal_watch = 0
        stored = [await submit(store, spec(i)) for i in range(3)]
        small_disk.fill()
        for i in range(5):
            failure = await refused(store.submit([spec(10 + i)], 1.0, [ids.new()]))
            assert failure.check(StorageFull), failure
            assert failure.getErrorMessage() == "database or disk is full"
        full = "the store's disk took no more (database or disk is full)"
        assert lines(logged, full) == [
            f"{full}: 1 writes failed since the last line; submissions are answered "
            "507 until it has room, ends of jobs are written again (logged at most "
            "once a minute)"
        ]
        # The sync loop's turn: the checkpoint fails, and says so once.
        for _ in range(3):
            turned = len(logged)
            clock.advance(1)
            await until(lambda: store._writer._checkpoint_trouble.count or len(logged) > turned)
        assert len(lines(logged, "checkpointing the store")) == 1
        (line,) = lines(logged, "checkpointing the store")
        assert "failed (database or disk is full)" in line
        # A minute on, the next failure is said with the count meanwhile.
        clock.advance(60)
        await refused(store.submit([spec(20)], 1.0, [ids.new()]))
        assert f"{full}: 5 writes failed since the last line" in lines(logged, full)[-1]
        assert len(lines(logged, full)) == 2
        assert not [e for level, e, _ in logged if level is LogLevel.critical]

        small_disk.free()
        stored.append(await submit(store, spec(30)))
        assert lines(logged, "the store commits again") == [
            "the store commits again (0 more writes failed since the last line)"]
        clock.advance(1)
        await until(lambda: lines(logged, "checkpointing the store works again"))
        jobs, _ = await store.list_jobs()
        assert sorted(j.id for j in jobs) == sorted(s[0].id for s in stored)
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_the_sync_loop_survives_a_failed_sync(tmp_path, logged):
    """A sync that fails (the write-ahead log's fsync: EIO) leaves unsynced
    true and is logged once; the loop runs on, and its next turn syncs; a
    second failure within the minute is not logged again."""
    clock = Clock()
    store = SQLiteJobStore(str(tmp_path / "db.sqlite3"), reactor, clock=clock,
                           sync_interval=1)
    await store.open()
    try:
        await submit(store, spec(1))
        await store.claim(Offer("h", 1), 1, 2.0, 30.0)
        assert store.unsynced
        writer = store._writer
        real = writer.fsync
        tries = []

        def fsync(fd):
            tries.append(fd)
            if len(tries) <= 2:
                raise OSError(errno.EIO, "Input/output error")
            real(fd)

        writer.fsync = fsync
        clock.advance(1)
        await until(lambda: lines(logged, "syncing the store"))
        assert store.unsynced and store.syncs == 0
        (line,) = lines(logged, "syncing the store")
        assert "failed (EIO: Input/output error)" in line
        clock.advance(1)
        await until(lambda: len(tries) == 2)
        clock.advance(1)
        await until(lambda: not store.unsynced)
        assert store.syncs == 1 and len(tries) == 3
        await until(lambda: lines(logged, "syncing the store works again"))
        assert len(lines(logged, "syncing the store")) == 2
        # And it keeps turning.
        await store.claim(Offer("h", 1), 1, 3.0, 30.0)
        assert store.unsynced
        clock.advance(1)
        await until(lambda: not store.unsynced)
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_long_wait_for_the_write_lock_is_logged(tmp_path, logged):
    """A write that waits for the database's write lock, held by another
    connection (another process: a backup, a shell), logs a warning once the
    wait passes lock_warning, commits once the lock is let go, and says so."""
    path = str(tmp_path / "db.sqlite3")
    store = SQLiteJobStore(path, reactor)
    store._writer.lock_warning = 0.1
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        d = store.submit([spec(1)], 1.0, [ids.new()])
        await until(lambda: lines(logged, "has been locked by another process"))
        assert not d.called
        (line,) = lines(logged, "has been locked by another process")
        assert line == (
            f"the store's database {path} has been locked by another process for "
            "0.1 s; writes wait for it, up to 30 s")
        other.execute("COMMIT")
        await d
        await until(lambda: lines(logged, "was unlocked after"))
    finally:
        other.close()
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_daemon_on_a_full_disk_answers_507_and_loses_nothing(
        small_disk, make_daemon, logged, tmp_path):
    """A daemon whose data directory is full answers submissions, batches and
    cancels 507 insufficient_storage in the API's error form, logs one line
    for them all rather than a traceback each, and shows a job whose end it
    cannot write as waiting for the store; once the disk has room, the end
    lands, submissions are taken again, and every acknowledged job is there
    and runs."""
    go = tmp_path / "go"
    daemon = await make_daemon("[executor]\nslots = 1\n", data_dir=small_disk.path / "data")
    daemon.service.dispatcher.recorder.retry_first = 0.05
    running = await daemon.submit(
        {"command": ["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.01; done"]})
    await daemon.wait(running["id"], ("running",))
    # Queued behind it: the one slot is taken.
    acknowledged = [running["id"]] + [
        (await daemon.submit({"command": ["true"]}))["id"] for _ in range(3)]

    small_disk.fill()
    for i in range(20):
        code, answer = await daemon.json("POST", "/v1/jobs", {"command": ["true"]})
        assert code == 507, answer
        assert answer["error"]["code"] == "insufficient_storage"
        assert answer["error"]["field"] is None
        assert "database or disk is full" in answer["error"]["message"]
    code, answer = await daemon.json(
        "POST", "/v1/jobs/batch", {"jobs": [{"command": ["true"]}] * 3})
    assert code == 507 and answer["error"]["code"] == "insufficient_storage"
    code, answer = await daemon.json("POST", f"/v1/jobs/{acknowledged[1]}/cancel")
    assert code == 507 and answer["error"]["code"] == "insufficient_storage"

    # The running job ends; its end cannot be written.
    go.write_text("")

    for _ in range(1000):
        code, seen = await daemon.json("GET", f"/v1/jobs/{running['id']}")
        if (seen["wait_reason"] or "").startswith("ended (succeeded) at "):
            break
        await sleep(0.01)
    assert seen["state"] == "running", seen
    assert "recording the end waits for the store: database or disk is full" in (
        seen["wait_reason"])
    assert len(lines(logged, "the store's disk took no more")) == 1
    assert not lines(logged, "Traceback")
    assert not [line for level, line, _ in logged if level is LogLevel.critical]

    small_disk.free()
    await daemon.wait(running["id"], ("succeeded",), timeout=10)
    acknowledged.append((await daemon.submit({"command": ["true"]}))["id"])
    for job_id in acknowledged:
        assert (await daemon.wait(job_id, timeout=10))["state"] == "succeeded"
    code, page = await daemon.json("GET", "/v1/jobs?limit=100")
    assert [j["id"] for j in page["jobs"]] == acknowledged
    assert len(lines(logged, "the store commits again")) == 1


def test_a_trouble_that_comes_and_goes_gets_a_line_each_way_a_minute_at_most():
    """Throttle: the first time a trouble comes is logged at once, the next
    times within the minute are counted and told with the next line, its end
    is told once after a line said it was on, and a trouble that keeps coming
    and going (a nearly full disk) is told no more than that."""
    from dispatcher._throttle import Throttle

    clock = Clock()
    trouble = Throttle(clock)
    assert trouble.cleared() is None
    assert trouble.happened(2) == 2
    assert trouble.cleared() == 0
    for _ in range(10):
        clock.advance(1)
        assert trouble.happened() is None
        assert trouble.cleared() is None
    clock.advance(60)
    assert trouble.happened() == 11
    assert trouble.happened(3) is None
    assert trouble.on
    assert trouble.cleared() == 3
    assert not trouble.on
