"""
The store's checks of itself before it runs (SQLite's quick_check, and the
commit mark kept outside the database), and the operator's check, backup,
restore and reset-mark on real files.
"""

import os
import sqlite3

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.internet.task import Clock

from dispatcher.app._exit import ExitStatus
from dispatcher.store._maintenance import backup_store, check_store, reset_mark, restore_store
from dispatcher.store._mark import Mark, MarkFile
from dispatcher.store._results import CommitsLost, StoreDamaged
from dispatcher.store._sqlite import SQLiteJobStore
from tests.store_contract import claim, no_jitter, spec, submit


def seq_in(path):
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT seq FROM commits").fetchone()[0]
    finally:
        conn.close()


def mark_of(path):
    exists, mark = MarkFile(path).read()
    assert exists
    return mark


async def opened(path, **kw):
    kw.setdefault("backoff", no_jitter)
    store = SQLiteJobStore(path, reactor, **kw)
    await store.open()
    return store


async def fill(path, count, **kw):
    """A store at path with count submitted jobs, closed again; their ids."""
    store = await opened(path, **kw)
    made = []
    try:
        for i in range(count):
            (job,) = await submit(store, spec(i))
            made.append(job.id)
    finally:
        await store.close()
    return made


def test_a_mark_record_reads_back_and_a_torn_one_is_refused():
    """A mark reads back as written, within one fixed-size record; a record
    with a changed byte reads as no mark at all."""
    mark = Mark(123456789, 1796605540.808877)
    record = mark.encode()
    assert len(record) == 64 and record.endswith(b"\n")
    assert Mark.decode(record) == mark
    assert Mark.decode(record.replace(b"123", b"124", 1)) is None
    assert Mark.decode(b"") is None and Mark.decode(b"\xff" * 64) is None


@pytest_twisted.ensureDeferred
async def test_each_commit_is_numbered_and_durable_ones_are_marked(tmp_path):
    """Every commit bumps the number in the database; a submission's commit
    (synced) moves the mark file to it at once, a run-state commit only once
    the periodic sync has synced the log."""
    path = str(tmp_path / "db.sqlite3")
    clock = Clock()
    store = await opened(path, clock=clock, sync_interval=1.0)
    try:
        start = seq_in(path)
        assert mark_of(path).seq == start
        for i in range(3):
            await submit(store, spec(i))
        assert seq_in(path) == start + 3
        assert mark_of(path).seq == start + 3
        # A run-state commit alone (a claim) is not on the disk yet: the
        # mark stays behind it until the sync.
        await claim(store, "h", 1, 2.0)
        assert seq_in(path) == start + 4
        assert mark_of(path).seq == start + 3
        await store.sync()
        assert mark_of(path).seq == start + 4
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_store_that_lost_commits_refuses_to_open(tmp_path):
    """A database whose number is below its mark (here an older copy of the
    file put back in its place) is refused with a line naming the file, how
    many commits are gone and what to do; reset-mark accepts what it holds."""
    path = str(tmp_path / "db.sqlite3")
    await fill(path, 2)
    older = str(tmp_path / "older.sqlite3")
    backup_store(path, older)
    await fill(path, 5)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    os.replace(older, path)
    store = SQLiteJobStore(path, reactor)
    with pytest.raises(CommitsLost) as e:
        await store.open()
    await store.close()
    message = str(e.value)
    assert message.startswith(f"the store {path} lost 5 acknowledged commits")
    assert "dispatcher store restore" in message and "\n" not in message
    with pytest.raises(CommitsLost) as checked:
        check_store(path)
    assert str(checked.value) == message
    report = reset_mark(path)
    assert report.jobs == 2
    store = await opened(path)
    jobs, _ = await store.list_jobs()
    assert len(jobs) == 2
    await store.close()


@pytest_twisted.ensureDeferred
async def test_a_damaged_file_refuses_to_open(tmp_path):
    """64 flipped bytes in the middle of the file are found by the check at
    open, which names the file and says to restore a backup."""
    path = str(tmp_path / "db.sqlite3")
    await fill(path, 300)
    assert not os.path.exists(path + "-wal")
    size = os.path.getsize(path)
    middle = size // 4096 // 2 * 4096
    with open(path, "r+b") as f:
        f.seek(middle)
        data = f.read(64)
        f.seek(middle)
        f.write(bytes(b ^ 0xFF for b in data))
    store = SQLiteJobStore(path, reactor)
    with pytest.raises(StoreDamaged) as e:
        await store.open()
    await store.close()
    assert str(e.value).startswith(f"the store {path} is damaged (")
    assert "dispatcher store restore" in str(e.value)
    with pytest.raises(StoreDamaged):
        check_store(path)


async def refused_with_whole_pages(conn, path):
    """Close conn on a store whose pages quick_check finds whole, and the
    message with which the store at path refuses to open."""
    assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    conn.close()
    store = SQLiteJobStore(path, reactor)
    with pytest.raises(StoreDamaged) as e:
        await store.open()
    await store.close()
    return str(e.value)


@pytest_twisted.ensureDeferred
async def test_damage_inside_a_rows_text_refuses_to_open(tmp_path):
    """Bytes flipped inside a job's JSON text leave the file's structure
    whole, so quick_check passes them; the check at open still finds the
    row, and says how many rows of which table are damaged."""
    path = str(tmp_path / "db.sqlite3")
    ids = await fill(path, 20)
    conn = sqlite3.connect(path)
    spec_text = conn.execute("SELECT spec FROM jobs WHERE id = ?", (ids[7],)).fetchone()[0]
    # The same length, so that the page's layout stays as it was.
    broken = bytes(b ^ 0xFF for b in spec_text[:8].encode()).decode("latin-1")
    conn.execute("UPDATE jobs SET spec = ? WHERE id = ?", (broken + spec_text[8:], ids[7]))
    conn.commit()
    assert "1 rows of jobs hold damaged text" in await refused_with_whole_pages(conn, path)
    with pytest.raises(StoreDamaged):
        check_store(path)


@pytest_twisted.ensureDeferred
async def test_damage_inside_a_rows_plain_text_refuses_to_open(tmp_path):
    """Flipped bytes in text that is not JSON (an attempt's holder) are not
    UTF-8 any more: the check at open finds the row, where a read of the
    job would fail later."""
    path = str(tmp_path / "db.sqlite3")
    store = await opened(path)
    await submit(store, spec(1))
    await claim(store, "holder-one", 1, 2.0)
    await store.close()
    conn = sqlite3.connect(path)
    (holder,) = conn.execute("SELECT CAST(holder AS BLOB) FROM attempts").fetchone()
    # "holder-o" inverted: the "-" becomes a lead byte, "o" a continuation.
    broken = bytes(b ^ 0xFF for b in holder[:8]) + holder[8:]
    conn.execute("UPDATE attempts SET holder = CAST(? AS TEXT)", (broken,))
    conn.commit()
    assert "1 rows of attempts hold damaged text" in await refused_with_whole_pages(conn, path)


@pytest_twisted.ensureDeferred
async def test_a_backup_made_while_the_store_writes_restores(tmp_path):
    """A backup taken while the store is open and writing holds every job
    committed before it; restoring it keeps the old files aside, and the
    store opens on it with its mark reset."""
    path = str(tmp_path / "db.sqlite3")
    store = await opened(path)
    try:
        for i in range(20):
            await submit(store, spec(i))
        pending = [ensureDeferred(submit(store, spec(i))) for i in range(20, 40)]
        backup = str(tmp_path / "backup.sqlite3")
        # In a thread of its own, as a command beside the daemon would be.
        report = await deferToThread(backup_store, path, backup)
        for d in pending:
            await d
    finally:
        await store.close()
    assert report.jobs >= 20 and report.path == backup
    assert check_store(backup).jobs == report.jobs
    with pytest.raises(Exception, match="exists already"):
        backup_store(path, backup)
    restored = restore_store(path, backup)
    assert restored.jobs == report.jobs
    assert mark_of(path).seq == seq_in(path)
    assert [name for name in os.listdir(tmp_path) if ".before-restore-" in name]
    store = await opened(path)
    jobs, _ = await store.list_jobs(limit=1000)
    assert len(jobs) == report.jobs
    await store.close()


def test_a_damaged_backup_is_not_restored(tmp_path):
    """A restore checks the backup first: a file that is not a database is
    refused, and the store's files are left as they were."""
    path = str(tmp_path / "db.sqlite3")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(os.urandom(8192))
    with pytest.raises(StoreDamaged, match=str(bad)):
        restore_store(path, str(bad))
    assert sorted(os.listdir(tmp_path)) == ["bad.sqlite3", "db.sqlite3"]


def test_a_failed_start_sets_the_exit_status():
    """The exit handler ends the process with the status a failed start set,
    and leaves Python's own exit alone otherwise."""
    handlers, exits = [], []
    status = ExitStatus(register=handlers.append, exit=exits.append)
    (handler,) = handlers
    handler()
    assert exits == []
    status.fail()
    handler()
    assert exits == [1]
