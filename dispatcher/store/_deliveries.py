"""
The SQLite store's webhook outbox: the deliveries due (a read), and what
the delivery service did with those it tried (a write: the delivered and
given-up ones deleted, the others put later).  The rows are made by the
triggers of L{dispatcher.store._schema} (L{WEBHOOK_OUTBOX}), in the
transaction of the change of state each tells of.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Sequence

from dispatcher.model._deliveries import Delivery
from dispatcher.model._jobs import JobState
from dispatcher.store._results import Written

if TYPE_CHECKING:
    from dispatcher.store._operations import WriterState


_DUE = (
    "SELECT id, job_id, url, at, state, previous, owner, queue, name, array_id,"
    " batch_id, attempt, exit_code, error, tries FROM deliveries INDEXED BY deliveries_due"
    " WHERE due <= ? ORDER BY due, id LIMIT ?"
)


def due_deliveries(
    conn: sqlite3.Connection, now: float, limit: int, exclude: Sequence[int] = ()
) -> list[Delivery]:
    """
    At most C{limit} deliveries due at C{now}, the longest due first (then
    in the order they were made), but those of C{exclude}.
    """
    out = []
    skip = set(exclude)
    for row in conn.execute(_DUE, (now, limit + len(skip))):
        if row[0] in skip:
            continue
        (id, job_id, url, at, state, previous, owner, queue, name, array_id, batch_id,
         attempt, exit_code, error, tries) = row
        out.append(Delivery(
            id, job_id, url, at, JobState(state),
            None if previous is None else JobState(previous),
            owner, queue, name, array_id, batch_id, attempt, exit_code, error, tries,
        ))
    return out[:limit]


def claim_deliveries(
    writer: WriterState,
    conn: sqlite3.Connection,
    now: float,
    limit: int,
    hold: float,
    exclude: Sequence[int],
) -> Written:
    """
    Take at most C{limit} deliveries due at C{now} (but those of
    C{exclude}) for the caller alone (L{dispatcher.store._writes.ClaimDeliveries}):
    each is due again only at C{now + hold}, so that no other dispatcher on
    the database reads it meanwhile; the caller's record of its try puts
    it later or removes it, and one whose caller died is due again then.
    Groups of writes commit one at a time (the write lock), so two claims
    never take one delivery.
    """
    claimed = due_deliveries(conn, now, limit, exclude)
    if claimed:
        conn.executemany(
            "UPDATE deliveries SET due = ? WHERE id = ?",
            [(now + hold, delivery.id) for delivery in claimed],
        )
    return Written(claimed)


def record_deliveries(
    writer: WriterState,
    conn: sqlite3.Connection,
    done: Sequence[int],
    later: Sequence[tuple[int, float]],
) -> Written:
    """
    Record what the delivery service did with the deliveries it tried
    (L{dispatcher.store._writes.RecordDeliveries}): those C{done}
    (delivered or given up) are deleted, those C{later} (C{(id, due)}) have
    one more try counted and wait until their C{due}.  A delivery no
    longer there (its job was removed meanwhile) is passed over.
    """
    if done:
        conn.executemany("DELETE FROM deliveries WHERE id = ?", [(i,) for i in done])
    if later:
        conn.executemany(
            "UPDATE deliveries SET tries = tries + 1, due = ? WHERE id = ?",
            [(due, i) for i, due in later],
        )
    return Written(None)
