"""
C{dispatcher wait}: until jobs, an array or a batch are final, with a
progress bar for a person, and the exit status that says how they ended.

It asks the dispatcher to answer when the job (or the whole group) is
final (C{?wait=}), but no later than a second or so, so that the bar moves
as members finish; a group costs one request a second however large.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

from dispatcher.cli._render import FINAL_STATES, get, text

# Exit statuses of wait (and of submit --wait), as the README lists them.
SUCCEEDED = 0
FAILED = 1
USAGE = 2
TIMED_OUT = 3

# How long one request waits for the job or group to be final, at most:
# the bar's refresh when nothing finishes.
STEP = 1.0

# Requests a second spent checking jobs other than the one being waited
# on, at most, when waiting for several ids.
CHECKS_PER_SECOND = 50


def state_of(job: Any) -> str:
    """
    A job's state as a string.
    """
    state = get(job, "state")
    return str(getattr(state, "value", state))


def outcome(states: Sequence[str]) -> int:
    """
    The exit status for jobs that ended in C{states}.
    """
    if not all(state in FINAL_STATES for state in states):
        return TIMED_OUT
    return SUCCEEDED if all(state == "succeeded" for state in states) else FAILED


class Progress:
    """
    A progress bar on stderr (rich), or nothing when stderr is no terminal
    or when C{enabled} is false: the bar is for people, stdout for the
    answer.
    """

    def __init__(self, description: str, total: Optional[int], enabled: bool) -> None:
        self.description = description
        self.total = total
        self.bar: Any = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress as Bar,
                SpinnerColumn,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            from dispatcher.cli._render import console

            self.bar = Bar(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                MofNCompleteColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[states]}"),
                console=console(stderr=True),
            )
            self.task = self.bar.add_task(description, total=total, states="")

    def __enter__(self) -> "Progress":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, finished: int, counts: dict[str, int]) -> None:
        """
        Show C{finished} of the total final, and how many are in each state.
        """
        if self.bar is not None:
            states = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
            self.bar.update(self.task, completed=finished, states=states)


def _deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else time.monotonic() + timeout


def _step(deadline: Optional[float], step: float = STEP) -> float:
    if deadline is None:
        return step
    left = deadline - time.monotonic()
    # Below a hundredth of a second the time is up: the API's wait takes
    # a positive number, and one that short asks for nothing.
    return round(min(step, left), 2) if left >= 0.01 else 0.0


def _waited(ask: Callable[[], Any], step: float, final: Callable[[Any], bool]) -> Any:
    """
    C{ask()}'s answer, given no sooner than C{step} seconds after asking
    unless it is final: a dispatcher that answers a wait at once (one
    that does not know C{?wait=}) is then asked once a step, not in a
    tight loop.
    """
    started = time.monotonic()
    answer = ask()
    if not final(answer):
        time.sleep(max(0.0, step - (time.monotonic() - started)))
    return answer


def wait_for_jobs(
    client: Any, ids: Sequence[str], timeout: Optional[float],
    progress: Progress,
) -> list[Any]:
    """
    Wait until every job of C{ids} is final or C{timeout} seconds have
    passed; returns the jobs as last seen, in the order of C{ids}.

    One job at a time is waited on with C{?wait=}; the others are checked
    each time that answer comes, which is at most once a second, less
    often when there are many (L{CHECKS_PER_SECOND}).
    """
    deadline = _deadline(timeout)
    seen: dict[str, Any] = {}
    waited = None
    while True:
        for job_id in ids:
            if job_id != waited and (
                    job_id not in seen or state_of(seen[job_id]) not in FINAL_STATES):
                seen[job_id] = client.job(job_id)
        pending = [i for i in ids if state_of(seen[i]) not in FINAL_STATES]
        counts: dict[str, int] = {}
        for job_id in ids:
            counts[state_of(seen[job_id])] = counts.get(state_of(seen[job_id]), 0) + 1
        progress.update(len(ids) - len(pending), counts)
        if not pending:
            break
        step = _step(deadline, max(STEP, len(pending) / CHECKS_PER_SECOND))
        if step <= 0:
            break
        waited = pending[0]
        seen[waited] = _waited(lambda: client.job(waited, wait=step), step,
                               lambda job: state_of(job) in FINAL_STATES)
    return [seen[i] for i in ids]


def wait_for_group(
    client: Any, kind: str, group_id: str, timeout: Optional[float], progress: Progress,
) -> Any:
    """
    Wait until every member of the array or batch C{group_id} is final or
    C{timeout} seconds have passed; returns the group (a C{JobGroup}) as
    last seen.
    """
    fetch = client.array if kind == "array" else client.batch
    deadline = _deadline(timeout)
    group = fetch(group_id)
    while True:
        progress.total = get(group, "size")
        if progress.bar is not None:
            progress.bar.update(progress.task, total=progress.total)
        counts = {text(state): n for state, n in (get(group, "counts") or {}).items()}
        progress.update(get(group, "finished"), counts)
        if get(group, "final"):
            return group
        step = _step(deadline)
        if step <= 0:
            return group
        group = _waited(lambda: fetch(group_id, wait=step), step,
                        lambda group: bool(get(group, "final")))


def group_outcome(group: Any) -> int:
    """
    The exit status for an array or a batch as last seen.
    """
    if not get(group, "final"):
        return TIMED_OUT
    return SUCCEEDED if get(group, "succeeded") else FAILED
