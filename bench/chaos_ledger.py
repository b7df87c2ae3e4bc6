"""
The chaos suite's ledger and its reading: the shell script every chaos job
runs, and the pure functions that turn what the jobs wrote, what the
dispatcher says about them and what the load was told into one scenario's
tally.  Nothing here starts a process or opens a socket, so the default
test suite checks it on made-up ledgers (tests/test_chaos_ledger.py).

The ledger is one text file a scenario's jobs append to under an exclusive
C{flock}, one line per event:

    start JOB ATTEMPT PID REALTIME HELD
    end JOB ATTEMPT PID REALTIME

C{HELD} is 1 when the run found its job's own lock file already locked by
another run of the same job still alive (two runs at once), 0 otherwise.
A run that was killed has a C{start} and no C{end}; a run that exited 0
always wrote its C{end} last.
"""

from __future__ import annotations

import datetime
from typing import Iterable, Mapping, Optional

import attrs

FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})

# Every chaos job runs this with sh: $1 is how long it sleeps.  It appends
# its start to the ledger, holding the ledger's lock only for the write, and
# holds its job's own lock file for as long as it runs: a run that finds
# that lock taken was started while another run of the same job was still
# alive (its process group holds the lock until the last of it dies), and
# says so in its start line.  The end line is the last thing it does, so a
# run that wrote it exited 0.
JOB_SCRIPT = r"""
d="$CHAOS_DIR"; id="$DISPATCHER_JOB_ID"; a="$DISPATCHER_ATTEMPT"
exec 8>>"$d/locks/$id"
if flock -n 8; then held=0; else held=1; fi
exec 9>>"$d/ledger"
flock 9; echo "start $id $a $$ $(date +%s.%N) $held" >&9; flock -u 9
sleep "$1"
flock 9; echo "end $id $a $$ $(date +%s.%N)" >&9; flock -u 9
""".strip()


@attrs.frozen
class Run:
    """
    One run of a job's process as its ledger lines tell it.

    @ivar job: the job's id.
    @ivar attempt: C{DISPATCHER_ATTEMPT} as the run saw it.
    @ivar pid: the run's shell's process id (unique among the live runs).
    @ivar started: when it started (seconds since the epoch).
    @ivar ended: when it wrote its end, or C{None}: it was killed, or it
        still runs.
    @ivar held: its job's lock was held by another live run when it started.
    """

    job: str
    attempt: int
    pid: int
    started: float
    ended: Optional[float] = None
    held: bool = False


def parse_ledger(text: str) -> list[Run]:
    """
    The runs of a ledger's text, in the order they started.  A line cut
    short (a run killed while it wrote) is skipped; an end is matched to
    the latest start of the same job and process id.
    """
    runs: list[Run] = []
    open_runs: dict[tuple[str, int], int] = {}
    for line in text.splitlines():
        fields = line.split()
        try:
            if fields[0] == "start" and len(fields) == 6:
                job, attempt, pid = fields[1], int(fields[2]), int(fields[3])
                open_runs[(job, pid)] = len(runs)
                runs.append(Run(job, attempt, pid, float(fields[4]), None, fields[5] == "1"))
            elif fields[0] == "end" and len(fields) == 5:
                key = (fields[1], int(fields[3]))
                if key in open_runs:
                    index = open_runs.pop(key)
                    runs[index] = attrs.evolve(runs[index], ended=float(fields[4]))
        except (IndexError, ValueError):
            continue
    return runs


def overlapping_runs(runs: Iterable[Run]) -> list[Run]:
    """
    The runs that started while another run of the same job was still
    running: those that found their job's lock held, and those whose start
    falls inside the interval of an earlier run that wrote its end (the
    lock says it first; the intervals check it when a lock was missed).
    """
    by_job: dict[str, list[Run]] = {}
    for run in runs:
        by_job.setdefault(run.job, []).append(run)
    found = []
    for job_runs in by_job.values():
        job_runs.sort(key=lambda r: r.started)
        for i, run in enumerate(job_runs):
            earlier = job_runs[:i]
            if run.held or any(
                    e.pid != run.pid and e.ended is not None and e.ended > run.started
                    for e in earlier):
                found.append(run)
    return found


@attrs.frozen
class Tally:
    """
    What one scenario did to its jobs.

    @ivar acknowledged: jobs the load was told were stored (201, or 200 for
        a resent idempotency key).
    @ivar lost: acknowledged jobs the dispatcher no longer has, cannot
        read, or never brought to a final state by the deadline.
    @ivar duplicated: jobs that ran to success (wrote their end) more than
        once.
    @ivar overlaps: runs that started while another run of the same job
        ran.
    @ivar succeeded_recorded_failed: jobs recorded C{failed} although one of
        their runs exited 0.
    @ivar stuck: jobs (acknowledged or found in the dispatcher) not final by
        the deadline.
    @ivar phantom: jobs recorded C{succeeded} with no run that exited 0.
    @ivar failed: jobs recorded C{failed} (for any reason: a job whose
        only attempt was killed fails honestly).
    @ivar failed_unrun: failed jobs none of whose runs ever started.
    @ivar examples: a few job ids for each count that is not zero.
    """

    acknowledged: int
    lost: int
    duplicated: int
    overlaps: int
    succeeded_recorded_failed: int
    stuck: int
    phantom: int
    failed: int
    failed_unrun: int
    examples: Mapping[str, list[str]] = attrs.field(factory=dict)

    def failures(self) -> list[str]:
        """The names of the counts that break a promise, where not zero."""
        return [name for name in ("lost", "duplicated", "overlaps",
                                  "succeeded_recorded_failed", "stuck", "phantom")
                if getattr(self, name)]


# What the dispatcher said about an acknowledged job it could not show.
ABSENT = "absent"
UNREADABLE = "unreadable"


def tally(acknowledged: Iterable[str], jobs: Mapping[str, object],
          runs: Iterable[Run], examples: int = 3) -> Tally:
    """
    Count what a scenario did.

    @param acknowledged: the ids the load was told were stored.
    @param jobs: every job id the dispatcher was asked about or listed,
        mapped to its job (a dict, as C{GET /v1/jobs/{id}} answers it), or
        to L{ABSENT} (404) or L{UNREADABLE} (any other answer).
    @param runs: the ledger's runs.
    """
    acked = set(acknowledged)
    runs = list(runs)
    ended: dict[str, int] = {}
    started: set[str] = set()
    for run in runs:
        started.add(run.job)
        if run.ended is not None:
            ended[run.job] = ended.get(run.job, 0) + 1

    def state(job_id: str) -> Optional[str]:
        job = jobs.get(job_id)
        return job.get("state") if isinstance(job, dict) else None

    known = sorted(acked | {j for j, v in jobs.items() if isinstance(v, dict)})
    lost = sorted(j for j in acked if state(j) not in FINAL_STATES)
    stuck = sorted(j for j in known if isinstance(jobs.get(j), dict)
                   and state(j) not in FINAL_STATES)
    duplicated = sorted(j for j, n in ended.items() if n > 1)
    overlaps = overlapping_runs(runs)
    failed = sorted(j for j in known if state(j) == "failed")
    recorded_failed = sorted(j for j in failed if ended.get(j))
    phantom = sorted(j for j in known if state(j) == "succeeded" and not ended.get(j))
    failed_unrun = sorted(j for j in failed if j not in started)
    found = {
        "lost": lost, "duplicated": duplicated,
        "overlaps": sorted({r.job for r in overlaps}),
        "succeeded_recorded_failed": recorded_failed, "stuck": stuck,
        "phantom": phantom, "failed_unrun": failed_unrun,
    }
    return Tally(
        acknowledged=len(acked), lost=len(lost), duplicated=len(duplicated),
        overlaps=len(overlaps), succeeded_recorded_failed=len(recorded_failed),
        stuck=len(stuck), phantom=len(phantom), failed=len(failed),
        failed_unrun=len(failed_unrun),
        examples={k: v[:examples] for k, v in found.items() if v})


def timestamp(text: Optional[str]) -> Optional[float]:
    """An RFC 3339 time of the API as seconds since the epoch, or C{None}."""
    if not text:
        return None
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def first_finish_after(jobs: Iterable[object], after: float,
                       holders: Optional[frozenset[str]] = None) -> Optional[float]:
    """
    Seconds from C{after} to the first job recorded C{succeeded} that
    finished after it (on one of C{holders}, when given), or C{None}.
    """
    best = None
    for job in jobs:
        if not isinstance(job, dict) or job.get("state") != "succeeded":
            continue
        if holders is not None and job.get("worker") not in holders:
            continue
        finished = timestamp(job.get("finished_at"))
        if finished is not None and finished >= after and (best is None or finished < best):
            best = finished
    return None if best is None else best - after


# The table


COLUMNS = [
    ("scenario", "scenario"), ("verdict", "verdict"), ("acknowledged", "acked"),
    ("lost", "lost"), ("duplicated", "dup. successes"), ("overlaps", "overlaps"),
    ("succeeded_recorded_failed", "succeeded→failed"), ("stuck", "stuck"),
    ("failed", "failed (unrun)"), ("recovery_submit", "recovery: submit"),
    ("recovery_finish", "recovery: finish"),
]


def _cell(row: Mapping[str, object], key: str) -> str:
    value = row.get(key)
    if key == "failed" and value is not None:
        return f"{value} ({row.get('failed_unrun', 0)})"
    if key.startswith("recovery"):
        return "—" if value is None else f"{value:.1f} s"
    return "—" if value is None else str(value)


def table(rows: Iterable[Mapping[str, object]], markdown: bool = False) -> str:
    """
    The scenarios' results as a table: Markdown for the docs page, aligned
    text for the terminal.  A count the scenario could not take (the
    daemon refused to start, the harness failed) shows as "—".
    """
    cells = [[title for _, title in COLUMNS]]
    cells += [[_cell(row, key) for key, _ in COLUMNS] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |",
                 "| " + " | ".join("---" for _ in COLUMNS) + " |"]
        lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in cells)
