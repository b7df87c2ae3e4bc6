"""
How the commands show what they got: for people, tables and key/value
listings drawn by rich; for scripts (C{--json}), one JSON document per
answer, or one JSON line per item of a stream.
"""

from __future__ import annotations

import datetime
import sys
from typing import Any, Iterable, Mapping, Optional, Sequence

import msgspec

FINAL_STATES = ("succeeded", "failed", "cancelled")

# rich's style of each state: what a person scans a table for.
STATE_STYLES = {
    "pending": "dim",
    "queued": "cyan",
    "staging": "blue",
    "running": "bold blue",
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "yellow",
}


def plain(value: Any) -> Any:
    """
    C{value} (a wire Struct, the client's answer, or plain data) as plain
    JSON-able data: dicts, lists, strings, numbers.
    """
    return msgspec.to_builtins(value)


def write_json(value: Any, lines: bool = False) -> None:
    """
    Print C{value} as JSON on stdout: indented when stdout is a terminal
    (a person reading), one compact line otherwise or for a stream's item
    (C{lines}), which C{jq} reads either way.
    """
    encoded = msgspec.json.encode(plain(value))
    if not lines and sys.stdout.isatty():
        encoded = msgspec.json.format(encoded, indent=2)
    sys.stdout.write(encoded.decode() + "\n")
    sys.stdout.flush()


def console(stderr: bool = False) -> Any:
    """
    A rich console on stdout (or stderr): colours on a terminal, plain text
    of unbounded width in a pipe, so that a table piped to C{grep} or
    C{awk} keeps one row a line.
    """
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(file=stream, highlight=False)
    return Console(file=stream, highlight=False, width=100_000, no_color=True,
                   soft_wrap=True)


def show(renderable: Any) -> None:
    """
    Print C{renderable} (a table, a listing) on stdout: as rich draws it on
    a terminal; in a pipe as plain lines without the padding that rich
    gives the last column, so that a script's C{grep}, C{awk} or C{cut}
    reads what it expects.
    """
    out = console()
    if sys.stdout.isatty():
        out.print(renderable)
        return
    with out.capture() as captured:
        out.print(renderable)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    sys.stdout.flush()


def text(value: Any) -> str:
    """
    A value of an answer as a person reads it: an enum (a state, a role)
    as its value, nothing as C{"-"}.
    """
    if value is None:
        return "-"
    return str(getattr(value, "value", value))


def get(item: Any, key: str, default: Any = None) -> Any:
    """
    A field of a job (a Struct or a dict), or C{default}.
    """
    if isinstance(item, Mapping):
        return item.get(key, default)
    value = getattr(item, key, default)
    return default if value is msgspec.UNSET else value


def parse_time(text: Optional[str]) -> Optional[datetime.datetime]:
    """
    An RFC 3339 time of the API as an aware datetime, or C{None}.
    """
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def age(text: Optional[str], now: Optional[datetime.datetime] = None) -> str:
    """
    How long ago an RFC 3339 time was, in the unit a person reads at a
    glance (C{"12s"}, C{"5m"}, C{"3h"}, C{"2d"}), or C{"-"}.
    """
    when = parse_time(text)
    if when is None:
        return "-"
    now = now or datetime.datetime.now(datetime.timezone.utc)
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def duration(start: Optional[str], end: Optional[str]) -> str:
    """
    How long an attempt or a job ran (to now while it runs), or C{"-"}.
    """
    began = parse_time(start)
    if began is None:
        return "-"
    ended = parse_time(end) or datetime.datetime.now(datetime.timezone.utc)
    seconds = max(0.0, (ended - began).total_seconds())
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def state_text(state: Any) -> Any:
    """
    A state, styled for a table.
    """
    from rich.text import Text

    value = getattr(state, "value", state)
    return Text(str(value), style=STATE_STYLES.get(str(value), ""))


def what_it_runs(job: Any) -> str:
    """
    A job's command line (quoted as a shell would need) or its task.
    """
    import shlex

    command = get(job, "command")
    if command:
        return shlex.join(command)
    task = get(job, "task")
    return f"task {task}" if task else "-"


def job_table(jobs: Iterable[Any], now: Optional[datetime.datetime] = None) -> Any:
    """
    Jobs as a table: one row each, the columns a person looks for first.
    """
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ID", "STATE", "NAME", "QUEUE", "OWNER", "AGE", "EXIT", "WHAT"):
        table.add_column(column, no_wrap=column != "WHAT",
                         overflow="ellipsis" if column == "WHAT" else "fold")
    for job in jobs:
        exit_code = get(job, "exit_code")
        table.add_row(
            get(job, "id"),
            state_text(get(job, "state")),
            get(job, "name") or "-",
            get(job, "queue") or "-",
            get(job, "owner") or "-",
            age(get(job, "created_at"), now),
            "-" if exit_code is None else str(exit_code),
            what_it_runs(job),
        )
    return table


def job_detail(job: Any) -> Any:
    """
    One job as a person reads it: its fields, one a line, then its
    attempts as a table.
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column()

    def row(key: str, value: Any) -> None:
        if value in (None, "", [], {}):
            return
        if not isinstance(value, str):
            # A task's result, its arguments: as JSON, which says what they are.
            value = msgspec.json.encode(plain(value)).decode()
        fields.add_row(key, Text(value))

    row("id", get(job, "id"))
    fields.add_row("state", state_text(get(job, "state")))
    row("name", get(job, "name"))
    row("runs", what_it_runs(job))
    row("args", get(job, "args"))
    row("kwargs", get(job, "kwargs"))
    row("owner", get(job, "owner"))
    row("queue", get(job, "queue"))
    row("priority", get(job, "priority"))
    row("labels", ", ".join(f"{k}={v}" for k, v in (get(job, "labels") or {}).items()))
    row("array", f"{get(job, 'array_id')} [{get(job, 'array_index')}]"
        if get(job, "array_id") else None)
    row("batch", get(job, "batch_id"))
    row("depends on", ", ".join(get(job, "depends_on") or []))
    row("created", get(job, "created_at"))
    row("started", get(job, "started_at"))
    row("finished", get(job, "finished_at"))
    row("ran for", duration(get(job, "started_at"), get(job, "finished_at"))
        if get(job, "started_at") else None)
    row("exit code", get(job, "exit_code"))
    row("result", get(job, "result"))
    row("error", get(job, "error"))
    row("waiting", get(job, "wait_reason"))
    row("worker", get(job, "worker"))
    row("timeout", get(job, "timeout"))
    row("max attempts", get(job, "max_attempts"))
    attempts = get(job, "attempts") or []
    if not attempts:
        return fields
    table = Table(box=None, pad_edge=False, header_style="bold", title_justify="left")
    for column in ("ATTEMPT", "HOLDER", "STARTED", "RAN FOR", "EXIT", "ERROR"):
        table.add_column(column)
    for attempt in attempts:
        exit_code = get(attempt, "exit_code")
        table.add_row(
            str(get(attempt, "number")),
            get(attempt, "holder") or "-",
            get(attempt, "started_at") or "-",
            duration(get(attempt, "started_at"), get(attempt, "finished_at")),
            "-" if exit_code is None else str(exit_code),
            get(attempt, "error") or "",
        )
    return Group(fields, "", table)


def group_detail(group: Any) -> Any:
    """
    An array or a batch as a person reads it: its size, how many have
    finished, and its counts by state.
    """
    from rich.table import Table

    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column()
    fields.add_row("id", get(group, "id"))
    fields.add_row("kind", get(group, "kind"))
    fields.add_row("owner", get(group, "owner") or "-")
    fields.add_row("created", get(group, "created_at") or "-")
    fields.add_row("finished", f"{get(group, 'finished')} of {get(group, 'size')}")
    counts = get(group, "counts") or {}
    fields.add_row("states", ", ".join(f"{text(state)} {n}" for state, n in counts.items() if n)
                   or "-")
    return fields


def queue_table(queues: Mapping[str, Any]) -> Any:
    """
    The queues: what runs and waits in each, and its limit.
    """
    from rich.table import Table

    states = ("pending", "queued", "running", "succeeded", "failed", "cancelled")
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("QUEUE")
    for state in states:
        table.add_column(state.upper(), justify="right")
    table.add_column("MAX RUNNING", justify="right")
    for name, queue in sorted(queues.items()):
        counts = get(queue, "counts") or {}
        limit = get(queue, "max_running")
        table.add_row(name, *(str(counts.get(state, 0)) for state in states),
                      "-" if limit is None else str(limit))
    return table


def worker_table(workers: Sequence[Any]) -> Any:
    """
    The connected workers: their capacity, what they hold, when last heard.
    """
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "SLOTS", "RUNNING", "CPUS", "MEMORY MB", "GPUS", "LABELS",
                   "LAST CONTACT"):
        table.add_column(column)
    for worker in workers:
        resources = get(worker, "resources")
        table.add_row(
            get(worker, "name"),
            str(get(worker, "slots")),
            str(len(get(worker, "running") or [])),
            str(get(resources, "cpus")),
            str(get(resources, "memory_mb")),
            str(get(resources, "gpus")),
            ", ".join(f"{k}={v}" for k, v in (get(worker, "labels") or {}).items()) or "-",
            f"{age(get(worker, 'last_contact'))} ago",
        )
    return table


def event_line(kind: str, data: Mapping[str, Any]) -> str:
    """
    One event as a line a person reads: when, what changed, to what.
    """
    at = data.get("at") or ""
    if kind == "job":
        change = data.get("state")
        if data.get("previous"):
            change = f"{data['previous']} -> {change}"
        extra = []
        if data.get("name"):
            extra.append(repr(data["name"]))
        if data.get("exit_code") is not None:
            extra.append(f"exit {data['exit_code']}")
        if data.get("error"):
            extra.append(data["error"])
        return f"{at}  job {data.get('job_id')}  {change}" + (
            "  " + "  ".join(extra) if extra else "")
    if kind == "worker":
        return f"{at}  worker {data.get('worker')}  {data.get('change')}"
    if kind == "reset":
        return (f"events before {data.get('oldest')} are no longer kept: "
                "list the jobs again to catch up")
    if kind == "dropped":
        return f"the dispatcher dropped this stream ({data.get('reason')})"
    return f"{at}  {kind}  {msgspec.json.encode(plain(data)).decode()}"
