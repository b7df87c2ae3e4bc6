"""
The SQLite store's rows: the columns of the C{jobs} table that hold a
job's fields, each named once in L{JOB_COLUMNS} with what it holds and how
its value is stored and read back, and what is derived from that table:
the INSERT and SELECT column lists, a new job's row and L{Job}
(L{new_job}), and a L{JobSpec} and a L{Job} from a row
(L{spec_from_row}, L{job_from_row}).  Adding a column is one entry here
(and a migration in L{dispatcher.store._schema}).

The columns of an attempt's row are L{Attempt}'s fields, by name.

The functions a row is made and read with are compiled from the table
when this module is imported, as C{attrs} and C{namedtuple} make theirs:
a loop over the table for each row cost a claim and a job view a third
more than the unrolled function (a new job's row, each submission).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import attrs

from dispatcher.model._jobs import Attempt, Job, JobSpec, JobState
from dispatcher.store._stored import (
    decode_stored,
    encode_stored,
    limits_from_stored,
    log_cut_from_stored,
    spec_from_stored,
    spec_to_stored,
)

# What a column holds: a field of the job's spec, the rest of the spec as
# JSON, a field of the job, or something of the row alone.
SPEC = "spec"
STORED = "stored"
JOB = "job"
ROW = "row"


@attrs.frozen
class Column:
    """
    One column of the C{jobs} table that holds a job's field.

    @ivar name: the column's name, and the field's (of the L{JobSpec} for
        a C{SPEC} column, of the L{Job} for a C{JOB} one).
    @ivar holds: C{SPEC}, C{STORED}, C{JOB} or C{ROW}.
    @ivar inserted: whether a new job's row sets it (else it starts NULL,
        or at its default).
    @ivar viewed: whether a job is read back with it (L{job_from_row}).
    @ivar to_stored: the expression that turns the field's value (C{{0}})
        into the column's, if the column does not hold the value as it is.
    @ivar from_stored: the expression that turns the column's value
        (C{{0}}) back into the field's.

    The expressions are written into the compiled functions (a call of a
    converter for each column cost a new job a twentieth of its time);
    they may name what L{_NAMES} holds.
    """

    name: str
    holds: str
    inserted: bool = True
    viewed: bool = True
    to_stored: str = "{0}"
    from_stored: str = "{0}"


# What the columns' expressions may name.
_NAMES: dict[str, Any] = {
    "Job": Job,
    "JobState": JobState,
    "spec_from_stored": spec_from_stored,
    "decode_stored": decode_stored,
    "encode_stored": encode_stored,
    "spec_to_stored": spec_to_stored,
}


# The job's columns, in the order the SELECT and INSERT lists name them.
# The run-state columns (the lease, the attempt counts, a cancel asked
# for) are the operations' own, and not here.
JOB_COLUMNS: tuple[Column, ...] = (
    Column("seq", ROW),
    Column("id", JOB),
    Column("state", JOB, to_stored="{0}.value", from_stored="JobState({0})"),
    Column("name", SPEC),
    Column(
        "labels",
        SPEC,
        to_stored="(encode_stored({0}) if {0} else '{{}}')",
        from_stored="(decode_stored({0}) if {0} != '{{}}' else {{}})",
    ),
    # The spec's fields that have no column, as JSON (store/_stored.py).
    Column(
        "spec",
        STORED,
        to_stored="encode_stored(spec_to_stored({0}))",
        from_stored="decode_stored({0})",
    ),
    Column("priority", SPEC),
    Column("queue", SPEC),
    Column("max_attempts", SPEC),
    Column("retry_delay", SPEC),
    Column("timeout", SPEC),
    Column("not_before", SPEC),
    Column("array_id", SPEC),
    Column("array_index", SPEC),
    Column("batch_id", SPEC),
    Column("created_at", JOB),
    Column("started_at", JOB, inserted=False),
    Column("finished_at", JOB),
    Column("exit_code", JOB, inserted=False),
    Column(
        "result", JOB, inserted=False, from_stored="(None if {0} is None else decode_stored({0}))"
    ),
    Column("error", JOB),
    Column("wait_reason", JOB),
    # How many of the jobs it depends on have not succeeded yet.
    Column("waiting_on", ROW, viewed=False),
    Column("cancelled_by", JOB),
    # The principal that submitted it (NULL: stored before jobs had owners).
    Column("owner", JOB),
)

_SPEC_PART = [c for c in JOB_COLUMNS if c.holds in (SPEC, STORED)]
_VIEWED = [c for c in JOB_COLUMNS if c.viewed]
_INSERTED = [c for c in JOB_COLUMNS if c.inserted]

# The columns L{spec_from_row} reads, in its order.
SPEC_COLUMNS = ", ".join(c.name for c in _SPEC_PART)
# How many they are.
SPEC_WIDTH = len(_SPEC_PART)
# The columns L{job_from_row} reads, in its order.
VIEW_COLUMNS = ", ".join(c.name for c in _VIEWED)
# The columns of a new job's row (L{new_job}), in its order.
INSERTED_COLUMNS: tuple[str, ...] = tuple(c.name for c in _INSERTED)
# The columns an attempt is read back with, in L{Attempt}'s order
# (L{attempt_from_row}).
ATTEMPT_COLUMNS = ", ".join(f.name for f in attrs.fields(Attempt))


def attempt_from_row(row: Sequence[Any]) -> Attempt:
    """
    The L{Attempt} of a row of L{ATTEMPT_COLUMNS}.
    """
    *plain, limits, log_cut = row
    return Attempt(*plain, limits_from_stored(limits), log_cut_from_stored(log_cut))


def spec_position(name: str) -> int:
    """
    Where the column C{name} is among L{SPEC_COLUMNS}.
    """
    return [c.name for c in _SPEC_PART].index(name)


def view_position(name: str) -> int:
    """
    Where the column C{name} is among L{VIEW_COLUMNS}.
    """
    return [c.name for c in _VIEWED].index(name)


def _compile(source: str, name: str) -> Callable[..., Any]:
    code = compile(source, f"<dispatcher.store._rows {name}>", "exec")
    namespace = dict(_NAMES, __name__=__name__)
    exec(code, namespace)
    function = namespace[name]
    function.__source__ = source
    return function


def _read(column: Column) -> str:
    # The expression that turns the column's value (a local of its name)
    # into its field's.
    return column.from_stored.format(column.name)


def _spec_reader() -> Callable[[Sequence[Any]], JobSpec]:
    (stored,) = [c for c in _SPEC_PART if c.holds == STORED]
    keywords = ", ".join(
        f"{c.name}={_read(c)}" for c in _SPEC_PART if c.holds == SPEC
    )
    source = (
        "def spec_from_row(row):\n"
        f"    {', '.join(c.name for c in _SPEC_PART)}, = row\n"
        f"    return spec_from_stored({_read(stored)}, {keywords})\n"
    )
    return _compile(source, "spec_from_row")


def _job_maker() -> Callable[..., Job]:
    # The job from a viewed row, given its spec, attempts and wait reason.
    # The wait reason is the caller's: a full queue changes it.
    given = [c for c in _VIEWED if c.holds == JOB and c.name != "wait_reason"]
    names = [c.name if c in given else "_" for c in _VIEWED]
    keywords = ", ".join(f"{c.name}={_read(c)}" for c in given)
    source = (
        "def make_job(row, spec, attempts, wait_reason):\n"
        f"    {', '.join(names)}, = row\n"
        "    return Job(spec=spec, attempts=attempts, wait_reason=wait_reason,"
        f" {keywords})\n"
    )
    return _compile(source, "make_job")


def _new_job_maker() -> Callable[..., tuple[tuple[Any, ...], Job]]:
    values = []
    for c in _INSERTED:
        value = f"spec.{c.name}" if c.holds == SPEC else "spec" if c.holds == STORED else c.name
        values.append(c.to_stored.format(value))
    given = [c.name for c in _INSERTED if c.holds in (JOB, ROW)]
    fields = ", ".join(f"{c.name}={c.name}" for c in _INSERTED if c.holds == JOB)
    source = (
        f"def new_job(spec, *, {', '.join(given)}):\n"
        f"    return ({', '.join(values)},), Job(spec=spec, {fields})\n"
    )
    return _compile(source, "new_job")


spec_from_row: Callable[[Sequence[Any]], JobSpec] = _spec_reader()
spec_from_row.__doc__ = """
The L{JobSpec} a row's L{SPEC_COLUMNS} hold.
"""

new_job: Callable[..., tuple[tuple[Any, ...], Job]] = _new_job_maker()
new_job.__doc__ = """
A new job's row, in L{INSERTED_COLUMNS} order, and the L{Job}: from its
spec, and a keyword argument for each of its other inserted columns.
"""

_make_job = _job_maker()
_SPEC_SLICE = slice(view_position(_SPEC_PART[0].name), view_position(_SPEC_PART[-1].name) + 1)
_WAIT_REASON = view_position("wait_reason")
# The position of a viewed row's seq (a page's cursor), id and state.
VIEW_SEQ = view_position("seq")
VIEW_ID = view_position("id")
VIEW_STATE = view_position("state")


def job_from_row(
    row: Sequence[Any],
    attempts: tuple[Attempt, ...],
    full_queues: Mapping[str, int],
) -> Job:
    """
    The L{Job} a row of L{VIEW_COLUMNS} holds, with its attempts; a queued
    job of a queue in C{full_queues} (at its limit of running jobs) says so
    as its wait reason.
    """
    spec = spec_from_row(row[_SPEC_SLICE])
    wait_reason = row[_WAIT_REASON]
    if row[VIEW_STATE] == JobState.QUEUED.value and spec.queue in full_queues:
        wait_reason = (
            f"queue {spec.queue} is at its limit of {full_queues[spec.queue]} "
            "running jobs"
        )
    return _make_job(row, spec, attempts, wait_reason)
