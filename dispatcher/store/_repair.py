"""
Schema migration 6: what a database holds that cannot be served is
repaired.

Versions before the store's own form (L{dispatcher.store._stored}) wrote
JSON with the standard library's defaults, which took in and wrote out a
lone surrogate as its C{\\ud800} escape and a number that is not finite
as C{NaN} or C{Infinity}.  Read back, a lone surrogate made every answer
that showed its job fail (C{GET /v1/jobs} answered 500 for every page
that held it), and C{NaN} was shown as C{null}.  Nothing writes such a
value now (L{dispatcher.model._values}); this repairs what is there, once:
each surrogate becomes U+FFFD and each number that is not finite C{null},
and the job's C{error} says what was replaced (it is logged too).

Only the JSON columns can hold such values: SQLite's driver refuses to
store a lone surrogate in text, and text that is not UTF-8 is damage,
which the store refuses to start on (L{dispatcher.store._mark}).  The
rows are picked by SQLite first (JSON text holding a C{\\ud} or C{\\uD}
escape, C{NaN} or C{Infinity}), so that a large database costs one scan
in C, and only those are read in Python.
"""

from __future__ import annotations

import json
import sqlite3

from twisted.logger import Logger

from dispatcher.model._values import repaired
from dispatcher.store._stored import encode_stored

log = Logger()

# The jobs' JSON columns, each with the name its value has in the API (a
# spec's fields are the job's own).
_JSON = {"labels": "labels", "spec": "", "result": "result"}
_SUSPECT = " OR ".join(
    f"instr({c}, '\\ud') OR instr({c}, '\\uD') OR instr({c}, 'NaN') OR instr({c}, 'Infinity')"
    for c in _JSON
)
# How many repaired jobs are logged one by one; the rest are counted.
_LOGGED = 20
# What the note in a repaired job's error starts with.
NOTE = "schema migration 6 replaced what could not be served"


def repair_unservable(conn: sqlite3.Connection) -> None:
    """
    Repair every job of C{conn} whose JSON holds what cannot be served;
    within the migration's transaction.
    """
    columns = ", ".join(_JSON)
    rows = conn.execute(
        f"SELECT rowid, id, error, {columns} FROM jobs WHERE {_SUSPECT}"
    ).fetchall()
    total = 0
    for rowid, job_id, error, *texts in rows:
        changes = {}
        faults: list[str] = []
        for column, text in zip(_JSON, texts):
            if text is None:
                continue
            # (json reads what earlier versions wrote: escapes of lone
            # surrogates, NaN and Infinity.)
            value, found = repaired(json.loads(text), _JSON[column])
            if found:
                changes[column] = encode_stored(value)
                faults += found
        if not faults:
            continue
        note = f"{NOTE}: {'; '.join(faults)}"
        changes["error"] = f"{error} ({note})" if error else note
        assignments = ", ".join(f"{c} = ?" for c in changes)
        conn.execute(
            f"UPDATE jobs SET {assignments} WHERE rowid = ?", (*changes.values(), rowid)
        )
        total += 1
        if total <= _LOGGED:
            log.warn(
                "schema migration 6 repaired job {job_id}: {faults}",
                job_id=job_id,
                faults="; ".join(faults),
            )
    if total:
        log.warn(
            "schema migration 6 repaired {count} jobs holding what could not be served "
            "({logged} logged above)",
            count=total,
            logged=min(total, _LOGGED),
        )
