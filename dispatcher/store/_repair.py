"""
Schema migration 6: what a database holds that cannot be served is
repaired.

Versions before the store's own form (L{dispatcher.store._stored}) wrote
JSON with the standard library's defaults, which took in and wrote out a
lone surrogate as its C{\\ud800} escape and a number that is not finite
as C{NaN} or C{Infinity}; read back, a lone surrogate made every answer
that showed its job fail (C{GET /v1/jobs} answered 500 for every page
that held it), and C{NaN} was shown as C{null}.  Nothing writes such a
value now (L{dispatcher.model._values}); this repairs what is there, once:
each surrogate becomes U+FFFD, each number that is not finite C{null},
and text that is not UTF-8 (which no dispatcher writes) is read with
U+FFFD in place of its bytes.  What was replaced is said in the job's
C{error}, and logged.

Rows are picked by SQLite first, so that a large database costs one scan
in C: JSON text holding a C{\\ud}/C{\\uD} escape, C{NaN} or C{Infinity},
and text whose bytes are not all ASCII (the only text that can fail to
be UTF-8).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Optional

from twisted.logger import Logger

from dispatcher.model._values import repaired
from dispatcher.store._stored import encode_stored

log = Logger()

# The JSON columns, each with the name its value has in the API (a spec's
# fields are the job's own).
_JSON = {"jobs": {"labels": "labels", "spec": "", "result": "result"}}
# The tables whose text is served, each with the column naming a row in
# the log, and the column where what was replaced is said (or None).
_TABLES = (("jobs", "id", "error"), ("attempts", "job_id", None))
# How many repaired rows are logged one by one; the rest are counted.
_LOGGED = 20
# What the note in a job's error starts with.
NOTE = "schema migration 6 replaced what could not be served"


def repair_unservable(conn: sqlite3.Connection) -> None:
    """
    Repair every row of C{conn}'s jobs and attempts that holds text that
    cannot be served; within the migration's transaction.
    """
    total = 0
    for table, name_column, note_column in _TABLES:
        columns = [
            row[1] for row in conn.execute(f"PRAGMA table_info({table})")
            if row[2].upper() == "TEXT"
        ]
        json_columns = _JSON.get(table, {})
        suspects = [f"length({c}) != length(CAST({c} AS BLOB))" for c in columns]
        suspects += [
            f"instr({c}, '\\ud') OR instr({c}, '\\uD') OR instr({c}, 'NaN') "
            f"OR instr({c}, 'Infinity')"
            for c in columns if c in json_columns
        ]
        selected = ", ".join(f"CAST({c} AS BLOB)" for c in columns)
        rows = conn.execute(
            f"SELECT rowid, {selected} FROM {table} WHERE {' OR '.join(suspects)}"
        ).fetchall()
        for rowid, *values in rows:
            changes: dict[str, str] = {}
            faults: list[str] = []
            texts = {}
            for column, data in zip(columns, values):
                if data is None:
                    continue
                text, found = _repaired_text(bytes(data), column, json_columns.get(column))
                texts[column] = text
                if found:
                    changes[column] = text
                    faults += found
            if not faults:
                continue
            if note_column is not None:
                note = f"{NOTE}: {'; '.join(faults)}"
                before = texts.get(note_column)
                changes[note_column] = note if not before else f"{before} ({note})"
            assignments = ", ".join(f"{c} = ?" for c in changes)
            conn.execute(
                f"UPDATE {table} SET {assignments} WHERE rowid = ?", (*changes.values(), rowid)
            )
            total += 1
            if total <= _LOGGED:
                log.warn(
                    "schema migration 6 repaired {table} of {name}: {faults}",
                    table=table,
                    name=texts.get(name_column, rowid),
                    faults="; ".join(faults),
                )
    if total:
        log.warn(
            "schema migration 6 repaired {count} rows holding what could not be served "
            "({logged} logged above)",
            count=total,
            logged=min(total, _LOGGED),
        )


def _repaired_text(data: bytes, column: str, json_name: Optional[str]) -> tuple[str, list[str]]:
    """
    The text of a column's bytes, repaired, with what was replaced; for a
    JSON column (named C{json_name} in the API), its value's text too.
    """
    faults = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", "replace")
        faults.append(f"{column}: bytes that are not UTF-8, now U+FFFD")
    if json_name is None:
        return text, faults
    try:
        value: Any = json.loads(text)
    except ValueError:
        # Not JSON at all: nothing this repair can read (the store's damage
        # checks are another matter).
        return text, faults
    value, found = repaired(value, json_name)
    if found:
        text = encode_stored(value)
        faults += found
    return text, faults
