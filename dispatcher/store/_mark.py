"""
What the store checks before it runs on a database file: that SQLite finds
no damage in it (C{PRAGMA quick_check}), and that it holds every commit its
mark file says was made.

Every commit of the group writer bumps a sequence number kept in the
database (the one row of C{commits}).  The mark file beside the database
(C{dispatcher.sqlite3.mark}) holds the highest number known to be on the
disk: it is written after each commit that synced the write-ahead log (a
submission, a cancel, a retry: what a client is told is done), and written
and synced by the periodic sync after it syncs the log.  It never runs
ahead of what the disk holds, so a power cut cannot make it lie; and it is
never synced on a commit's path, so it costs a commit one small write.

A database whose number is below its mark lost commits the mark saw made:
a write-ahead log that SQLite's recovery cut short at a damaged frame (the
frames after it are dropped without a word), or a database file replaced
by an older one.  The store refuses to run on it (L{CommitsLost}), before
any write of its own could overwrite what is left of the log.

What it detects: after the daemon dies (C{kill -9}, a crash) the kernel
still holds every write, so any acknowledged commit the database lacks is
found.  After a power cut, the commits older than the last periodic sync
(C{sync_interval}), and every durable one whose mark write reached the
disk.  Damage inside a row's text leaves the file's structure whole, so
C{quick_check} passes it; the check then finds the rows whose JSON text no
longer parses.  What it cannot find: damage that leaves valid text (SQLite
keeps no checksums of its own).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import zlib
from typing import Any, Optional

import attrs

from dispatcher.store._results import CommitsLost, StoreDamaged

# The mode of every file of the store (the database, whose mode SQLite
# gives its write-ahead log and index too, the mark, a backup): the jobs'
# env values may be secrets.
PRIVATE_MODE = 0o600


def make_private(path: str) -> None:
    """
    Make the file at C{path}, empty, with L{PRIVATE_MODE}, unless it
    exists: for SQLite to open, which would make it with 0644 less the
    umask.
    """
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_MODE))

# The mark file's name is the database's with this added.
MARK_SUFFIX = ".mark"
# One fixed-size record at the start of the file: a write of it never
# leaves a longer, older one's tail behind, and fits in one disk sector.
RECORD_BYTES = 64
# Bumps the sequence in the commit's own transaction.
BUMP = "UPDATE commits SET seq = ?, at = ? WHERE one = 1"
# At most this many of quick_check's findings go into the message.
FINDINGS = 3


def restore_advice(path: str) -> str:
    """
    What an operator does about a store that cannot be used.
    """
    data_dir = os.path.dirname(os.path.abspath(path))
    return (
        "stop the dispatcher, then restore the latest backup with "
        f"'dispatcher store restore BACKUP --data-dir {data_dir}' "
        f"('dispatcher store check --data-dir {data_dir}' tells what is wrong)"
    )


@attrs.frozen
class Mark:
    """
    The highest commit known to be on the disk.

    @ivar seq: its sequence number.
    @ivar at: when it was made (seconds since the epoch).
    """

    seq: int
    at: float

    def encode(self) -> bytes:
        """
        The record written at the start of the mark file.
        """
        body = f"dispatcher-mark {self.seq} {self.at!r}"
        line = f"{body} {zlib.crc32(body.encode('ascii')):08x}"
        return (line.ljust(RECORD_BYTES - 1) + "\n").encode("ascii")

    @classmethod
    def decode(cls, data: bytes) -> Optional["Mark"]:
        """
        The mark a record holds, or L{None} if it is not a whole one.
        """
        try:
            words = data.decode("ascii").split()
            tag, seq, at, crc = words
            body = f"{tag} {seq} {at}"
            if tag != "dispatcher-mark" or int(crc, 16) != zlib.crc32(body.encode("ascii")):
                return None
            return cls(int(seq), float(at))
        except (UnicodeDecodeError, ValueError):
            return None


class MarkFile:
    """
    The mark file beside a database.  Used from one thread at a time (the
    store's writer thread, or a command run while no daemon does).

    @param path: the database file; the mark is C{path + ".mark"}.
    """

    def __init__(self, path: str) -> None:
        self.path = path + MARK_SUFFIX
        self._fd: Optional[int] = None
        self._written: Optional[Mark] = None
        self._synced: Optional[Mark] = None

    def read(self) -> tuple[bool, Optional[Mark]]:
        """
        Whether the mark file exists, and the mark it holds (L{None} if it
        does not, or holds no whole record).
        """
        try:
            with open(self.path, "rb") as f:
                return True, Mark.decode(f.read(RECORD_BYTES))
        except FileNotFoundError:
            return False, None

    def write(self, mark: Mark, sync: bool = False) -> None:
        """
        Write C{mark} over the record; with C{sync}, make it durable too.
        Only a mark whose commit is on the disk may be written.
        """
        if mark != self._written:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
            os.pwrite(self._fd, mark.encode(), 0)
            self._written = mark
        if sync and self._synced != self._written and self._fd is not None:
            os.fsync(self._fd)
            self._synced = self._written

    def sync(self) -> None:
        """
        Make the last mark written durable, if it is not yet.
        """
        if self._written is not None:
            self.write(self._written, sync=True)

    def close(self) -> None:
        """
        Close the file (syncing the last mark written first).
        """
        if self._fd is not None:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = None


def quick_check(conn: sqlite3.Connection, path: str) -> None:
    """
    Run SQLite's C{quick_check} on the database: its pages, b-trees and
    records are whole (the index entries are not matched with their rows:
    that is C{integrity_check}, several times slower).

    @raise StoreDamaged: it found faults, or the file is not a database.
    """
    try:
        findings = [row[0] for row in conn.execute(f"PRAGMA quick_check({FINDINGS})")]
        if findings == ["ok"]:
            findings = _unreadable_rows(conn)
    except sqlite3.DatabaseError as e:
        raise StoreDamaged(damaged(path, str(e))) from e
    if findings and findings != ["ok"]:
        raise StoreDamaged(damaged(path, "; ".join(findings)))


# The columns that hold JSON text, by table.  Damage inside a row's text
# leaves the file's structure whole, so quick_check passes it; but flipped
# bytes in JSON almost always break its syntax, which SQLite's json_valid
# finds in C.
_JSON_COLUMNS = {
    "jobs": ("labels", "spec", "result"),
    "idempotency": ("job_ids",),
}


def _unreadable_rows(conn: sqlite3.Connection) -> list[str]:
    """
    Findings about rows whose text is damaged: none on a whole store.

    Every text column is sifted in C for the rows that could be damaged:
    JSON that C{json_valid} refuses, and text whose length in bytes is not
    its length in characters as SQLite counts them (inverted ASCII is bytes
    of 0x80 and up: a digit or a mark becomes a lead byte, which SQLite
    counts as one character with the continuation bytes, inverted letters,
    that follow it; a run of inverted letters alone is not sifted out, and
    a GLOB that would find it costs three times as much).  Only those rows
    are read again in Python, which
    decodes their UTF-8 strictly and parses their JSON with C{json} (which
    also takes the C{NaN} and C{Infinity} earlier versions wrote).  About
    0.9 s a million jobs here.
    """
    tables = [
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    findings = []
    for table in tables:
        columns = [
            row[1]
            for row in conn.execute(f"PRAGMA table_info({table})")
            if row[2].upper() == "TEXT"
        ]
        if not columns:
            continue
        json_columns = set(_JSON_COLUMNS.get(table, ()))
        suspect = " OR ".join(
            f"({c} IS NOT NULL AND NOT json_valid({c}))"
            if c in json_columns
            else f"length(CAST({c} AS BLOB)) <> length({c})"
            for c in columns
        )
        texts = ", ".join(f"CAST({c} AS BLOB)" for c in columns)
        count = sum(
            1
            for row in conn.execute(f"SELECT {texts} FROM {table} WHERE {suspect}")
            if not all(
                _parses(text, column in json_columns) for column, text in zip(columns, row)
            )
        )
        if count:
            findings.append(f"{count} rows of {table} hold damaged text")
    return findings


def _parses(text: Optional[bytes], is_json: bool) -> bool:
    if text is None:
        return True
    try:
        decoded = text.decode("utf-8")
        if is_json:
            json.loads(decoded)
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def damaged(path: str, what: str) -> str:
    """
    The one line that says a database file is damaged, and what to do.
    """
    return f"the store {path} is damaged ({what}): {restore_advice(path)}"


def is_damage(error: sqlite3.Error) -> bool:
    """
    Whether SQLite raised C{error} because the file is damaged or not a
    database (rather than, say, unreadable or locked).
    """
    code = getattr(error, "sqlite_errorcode", None)
    return code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def database_mark(conn: sqlite3.Connection) -> Optional[Mark]:
    """
    The last commit the database holds, or L{None} before the schema
    version that counts commits.
    """
    try:
        row = conn.execute("SELECT seq, at FROM commits WHERE one = 1").fetchone()
    except sqlite3.OperationalError:
        return None
    if row is None:
        return None
    return Mark(row[0], row[1])


def check_commits(
    conn: sqlite3.Connection,
    path: str,
    mark_file: MarkFile,
    read: Optional[tuple[bool, Optional[Mark]]] = None,
) -> Optional[str]:
    """
    Compare the database's last commit with the mark file.

    @param read: what C{mark_file.read()} gave, if it was read already
        (while a daemon runs, before the database's snapshot was taken).

    @return: a warning to log if the mark cannot be told (missing, or not
        a whole record), else L{None}.
    @raise CommitsLost: the database lacks commits the mark saw made.
    """
    exists, mark = read if read is not None else mark_file.read()
    if not exists:
        held = database_mark(conn)
        if held is not None and held.seq:
            return (
                f"{path} has no mark file ({mark_file.path}): whether it lost "
                "commits cannot be told this once"
            )
        return None
    if mark is None:
        return (
            f"the mark file {mark_file.path} holds no whole record: whether "
            f"{path} lost commits cannot be told this once"
        )
    held = database_mark(conn) or Mark(0, 0.0)
    if held.seq < mark.seq:
        raise CommitsLost(lost(path, held, mark))
    return None


def lost(path: str, held: Mark, mark: Mark) -> str:
    """
    The one line that says what a database lost, and what to do.
    """
    since = f"after {_when(held.at)}" if held.seq else "since it was made"
    return (
        f"the store {path} lost {mark.seq - held.seq} acknowledged commits: it "
        f"ends at commit {held.seq}, but commit {mark.seq} was made at "
        f"{_when(mark.at)} (its mark file says so); submissions, cancels and "
        f"retries acknowledged {since} may be gone (a damaged write-ahead log, "
        f"or an older database file put in its place): {restore_advice(path)}, "
        "or run on with what it holds with "
        f"'dispatcher store reset-mark --data-dir {os.path.dirname(os.path.abspath(path))}'"
    )


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def sync_database(path: str) -> None:
    """
    Sync the database's write-ahead log to the disk: what the database
    holds once opened (after a crash, what the kernel held) is durable, and
    a mark of it may be written.  (The database file itself is synced by
    every checkpoint.  It must not be opened here: closing any descriptor
    of it drops the POSIX locks SQLite's connections in this process hold
    on it, and another process would then take the database for unused.)
    """
    try:
        fd = os.open(path + "-wal", os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def start_marking(conn: sqlite3.Connection, path: str, mark_file: MarkFile) -> Mark:
    """
    After the checks and the migrations: sync what the database holds and
    mark it as the highest commit on the disk.  Returns that mark.
    """
    held = database_mark(conn)
    assert held is not None, "the migrations make the commits table"
    sync_database(path)
    mark_file.write(held, sync=True)
    return held


def describe(value: Any) -> str:
    """
    A mark as an operator reads it.
    """
    return f"commit {value.seq} of {_when(value.at)}" if value.seq else "no commit yet"
