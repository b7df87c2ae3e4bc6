"""
What an operator does to a store file: check it, back it up (online, with
SQLite's backup API: safe while the daemon runs), restore a backup, and
accept what a database that lost commits still holds.

Each runs in the calling thread, on files alone; the commands of
L{dispatcher.app._cli} call them (restoring and accepting only while they
hold the data directory's lock, so that no daemon runs on the file).
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Optional

import attrs

from dispatcher.store._mark import (
    Mark,
    MarkFile,
    check_commits,
    damaged,
    database_mark,
    describe,
    is_damage,
    make_private,
    quick_check,
    start_marking,
)
from dispatcher.store._results import StoreDamaged, StoreUnusable
from dispatcher.store._schema import migrate


@attrs.frozen
class StoreReport:
    """
    What a check found in a store that can be used.

    @ivar path: the database file.
    @ivar last_commit: the last commit it holds.
    @ivar mark: the mark file's, if it has a whole one.
    @ivar jobs: how many jobs it holds.
    @ivar warning: what the check could not tell, if anything.
    """

    path: str
    last_commit: Optional[Mark]
    mark: Optional[Mark]
    jobs: int
    warning: Optional[str] = None

    def summary(self) -> str:
        """
        One line for the operator.
        """
        held = describe(self.last_commit) if self.last_commit else "no commit count"
        line = f"{self.path}: ok, {self.jobs} jobs, {held}"
        if self.warning:
            line += f" ({self.warning})"
        return line


def _open(path: str) -> sqlite3.Connection:
    if not os.path.exists(path):
        raise StoreUnusable(f"the store {path} does not exist")
    try:
        return sqlite3.connect(path, isolation_level=None, timeout=30)
    except sqlite3.Error as e:
        raise StoreUnusable(f"the store {path} cannot be opened: {e}") from e


def _read_checks(conn: sqlite3.Connection, path: str, full: bool) -> None:
    try:
        if full:
            findings = [row[0] for row in conn.execute("PRAGMA integrity_check(3)")]
            if findings != ["ok"]:
                raise StoreDamaged(damaged(path, "; ".join(findings)))
        else:
            quick_check(conn, path)
    except sqlite3.Error as e:
        if is_damage(e):
            raise StoreDamaged(damaged(path, str(e))) from e
        raise StoreUnusable(f"the store {path} cannot be read: {e}") from e


def check_store(path: str, full: bool = False) -> StoreReport:
    """
    Check the store at C{path} as the daemon does at its start, writing
    nothing: SQLite's C{quick_check} (C{integrity_check}, which matches
    each index with its table too, with C{full}), and the commits its mark
    file says were made.  Safe while a daemon runs on it.

    @raise StoreDamaged: the file is damaged.
    @raise CommitsLost: it lacks acknowledged commits.
    @raise StoreUnusable: it cannot be opened at all.
    """
    conn = _open(path)
    try:
        # One read transaction: the mark is read first, and a running
        # daemon writes a mark only after its commit, so the database read
        # after it is never behind it.
        conn.execute("BEGIN")
        mark_file = MarkFile(path)
        read = mark_file.read()
        _read_checks(conn, path, full)
        warning = check_commits(conn, path, mark_file, read)
        mark = read[1]
        try:
            (jobs,) = conn.execute("SELECT count(*) FROM jobs").fetchone()
        except sqlite3.OperationalError:
            jobs = 0
        last = database_mark(conn)
        conn.execute("COMMIT")
    except sqlite3.Error as e:
        if is_damage(e):
            raise StoreDamaged(damaged(path, str(e))) from e
        raise StoreUnusable(f"the store {path} cannot be read: {e}") from e
    finally:
        conn.close()
    return StoreReport(path, last, mark, jobs, warning)


def backup_store(path: str, target: str) -> StoreReport:
    """
    Copy the store at C{path} to C{target} with SQLite's backup API (one
    consistent snapshot, while a daemon goes on writing), check the copy,
    sync it, and only then give it its name.

    @raise StoreUnusable: the store cannot be read, or C{target} exists.
    @raise StoreDamaged: the copy is damaged (the store is, then).
    """
    if os.path.exists(target):
        raise StoreUnusable(f"the backup {target} exists already; name another file")
    partial = f"{target}.partial-{os.getpid()}"
    source = _open(path)
    try:
        make_private(partial)
        copy = sqlite3.connect(partial, isolation_level=None)
        try:
            try:
                source.backup(copy)
            except sqlite3.Error as e:
                if is_damage(e):
                    raise StoreDamaged(damaged(path, str(e))) from e
                raise StoreUnusable(f"the store {path} cannot be backed up: {e}") from e
            # A single file, not in WAL mode: what a restore copies back.
            copy.execute("PRAGMA journal_mode=DELETE")
        finally:
            copy.close()
    finally:
        source.close()
    try:
        report = check_store(partial)
        _fsync(partial)
        os.replace(partial, target)
        _fsync_directory(os.path.dirname(os.path.abspath(target)))
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise
    return attrs.evolve(report, path=target, mark=None, warning=None)


def restore_store(path: str, backup: str) -> StoreReport:
    """
    Put the backup C{backup} in place of the store at C{path}, and mark it
    as the store's last commit so that the daemon starts on it.  The
    caller holds the data directory's lock: no daemon runs on C{path}.

    The store's files as they were (the database, its write-ahead log) are
    kept beside it, named C{<name>.before-restore-<time>}.

    @raise StoreDamaged: the backup is damaged.
    @raise StoreUnusable: the backup cannot be read.
    """
    check_store(backup)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    partial = f"{path}.restoring-{os.getpid()}"
    source = _open(backup)
    try:
        make_private(partial)
        copy = sqlite3.connect(partial, isolation_level=None)
        try:
            source.backup(copy)
        finally:
            copy.close()
    finally:
        source.close()
    _fsync(partial)
    # The old log must go before the new file takes the name: SQLite would
    # otherwise replay it onto the restored database.
    for suffix in ("-wal", "-shm", ""):
        old = path + suffix
        if os.path.exists(old):
            os.replace(old, f"{path}.before-restore-{stamp}{suffix}")
    os.replace(partial, path)
    _fsync_directory(os.path.dirname(os.path.abspath(path)))
    return reset_mark(path)


def reset_mark(path: str) -> StoreReport:
    """
    Accept what the store at C{path} holds as all there is: bring its
    schema up to date and write its mark from its last commit.  The caller
    holds the data directory's lock.

    @raise StoreDamaged: the file is damaged.
    """
    conn = _open(path)
    try:
        _read_checks(conn, path, full=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            migrate(conn, path)
            mark_file = MarkFile(path)
            try:
                start_marking(conn, path, mark_file)
            finally:
                mark_file.close()
        except sqlite3.Error as e:
            raise StoreUnusable(f"the store {path} cannot be written: {e}") from e
    finally:
        conn.close()
    return check_store(path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
