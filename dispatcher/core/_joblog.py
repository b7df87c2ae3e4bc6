"""
Each job's life in the daemon's log: started where, ended how, and remote
workers' coming and going, told from the committed events (the one
publication of every change, L{JobEvents.follow}), so that the log says
what the store holds, in its order.  Its submission (and a cancel, a
retry) is told by the API, one line a request, naming who asked
(L{dispatcher.api._handlers}).

Every line is a C{twisted.logger} event at info with keyword fields
(C{job_id}, C{owner}, C{attempt}, C{holder}, C{state}, ...): the text log
shows the sentence, the JSON log (C{[log] format = json}) the fields.

A line costs the reactor thread about 50 microseconds once an observer
renders it (measured: bench/job_lines.py, figures in the README), and a
no-op job makes three: at thousands of jobs a second the log would take
more of the one core than the jobs do.  So these lines are bounded: at
most C{lines_per_second} a second (C{[log] job_lines}); beyond that, what
was not written is counted, and told in one line when the second is over.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from twisted.logger import Logger

from dispatcher.model._events import CONNECTED, JobEvent, SameChange, WorkerEvent
from dispatcher.model._jobs import JobState

__all__ = ["JobLog"]

log = Logger()

Event = Union[JobEvent, WorkerEvent]

_QUEUED = JobState.QUEUED
_STAGING = JobState.STAGING
_RUNNING = JobState.RUNNING
_PENDING = JobState.PENDING
_ACTIVE = (JobState.STAGING, JobState.RUNNING)
_FINAL = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

# What the line of a summary calls each kind of line not written.
_KINDS = ("started", "succeeded", "failed", "cancelled", "requeued")


class JobLog:
    """
    Follows the committed events (give L{write} to L{JobEvents.follow}) and
    logs each job's life, at most C{lines_per_second} per-job lines a
    second (C{None}: no bound).

    @param clock: the C{IReactorTime} the seconds are counted on.
    @param lines_per_second: the bound (C{[log] job_lines}).
    @ivar quiet: set while the log's level leaves info out: then nothing is
        made at all (an event that no observer keeps still costs a few
        microseconds to make and drop).
    """

    def __init__(self, clock: Any, lines_per_second: Optional[int]) -> None:
        self._clock = clock
        self.lines_per_second = lines_per_second
        self.quiet = False
        self._window_end = 0.0
        self._lines = 0
        self._skipped: dict[str, int] = {}
        self._summary: Any = None

    def write(self, events: Sequence[Event]) -> None:
        """
        Log what one committed write changed (a follower of L{JobEvents}).
        """
        if self.quiet or type(events) is SameChange:
            # (New jobs are told by the API's line for their request.)
            return
        for event in events:
            if type(event) is WorkerEvent:
                self._worker(event)  # type: ignore[arg-type]
            elif event.previous is not None:  # type: ignore[union-attr]
                # (A new job is told by the API's line for its request.)
                self._changed(event)  # type: ignore[arg-type]

    def stop(self) -> None:
        """
        Tell what was left unwritten now, and cancel the timer that would.
        """
        if self._summary is not None and self._summary.active():
            self._summary.cancel()
        self._tell_skipped()

    def _room(self, kind: str) -> bool:
        """
        Whether one more per-job line may be written this second; if not,
        count it as C{kind}.
        """
        bound = self.lines_per_second
        if bound is None:
            return True
        now = self._clock.seconds()
        if now >= self._window_end:
            self._window_end = now + 1.0
            self._lines = 0
        if self._lines < bound:
            self._lines += 1
            return True
        self._skipped[kind] = self._skipped.get(kind, 0) + 1
        if self._summary is None or not self._summary.active():
            self._summary = self._clock.callLater(
                max(0.0, self._window_end - now), self._tell_skipped
            )
        return False

    def _tell_skipped(self) -> None:
        skipped, self._skipped = self._skipped, {}
        if not skipped:
            return
        total = sum(skipped.values())
        log.info(
            "{total} job lines not written in the last second (more than "
            "[log] job_lines = {bound} a second): {counts}",
            total=total,
            bound=self.lines_per_second,
            counts=", ".join(f"{skipped[k]} {k}" for k in _KINDS if k in skipped),
            skipped=skipped,
        )

    def _changed(self, event: JobEvent) -> None:
        state, previous = event.state, event.previous
        if state in _ACTIVE:
            if previous is _QUEUED:
                if self._room("started"):
                    log.info(
                        "job {job_id} attempt {attempt} started on {holder}"
                        + (", staging its inputs" if state is _STAGING else ""),
                        job_id=event.job_id,
                        owner=event.owner,
                        attempt=event.attempt,
                        holder=event.holder,
                        state=state.value,
                    )
            elif previous is _STAGING and state is _RUNNING and self._room("started"):
                log.info(
                    "job {job_id} attempt {attempt}: inputs staged, running on {holder}",
                    job_id=event.job_id,
                    owner=event.owner,
                    attempt=event.attempt,
                    holder=event.holder,
                    state=state.value,
                )
            return
        if state in _FINAL:
            if not self._room(state.value):
                return
            if event.exit_code is not None:
                how = " (exit code {exit_code})"
            elif event.error:
                how = ": {error}"
            else:
                how = ""
            where = " on {holder}" if event.holder is not None else ""
            attempt = " attempt {attempt}" if event.attempt is not None else ""
            log.info(
                "job {job_id}{attempt_text} {state}{where}" + how,
                attempt_text=attempt.format(attempt=event.attempt),
                where=where.format(holder=event.holder),
                job_id=event.job_id,
                owner=event.owner,
                attempt=event.attempt,
                holder=event.holder,
                state=state.value,
                previous=previous.value if previous is not None else None,
                exit_code=event.exit_code,
                error=event.error,
            )
            return
        if previous in _ACTIVE and state in (_QUEUED, _PENDING):
            if self._room("requeued"):
                # (A lease recovered after its expiry names its holder in
                # its error: the sweep's write holds several holders'.)
                log.info(
                    "job {job_id} attempt {attempt}"
                    + (" on {holder}" if event.holder is not None else "")
                    + " ended without a result ({error}); the job is {state} again",
                    job_id=event.job_id,
                    owner=event.owner,
                    attempt=event.attempt,
                    holder=event.holder,
                    state=state.value,
                    error=event.error,
                )
            return
        # (A pending job that became queued, its time come or its
        # dependencies met, is not told: its start says it; nor a retry,
        # which the API's line for the request tells.)

    def _worker(self, event: WorkerEvent) -> None:
        log.info(
            "worker {worker} " + ("connected" if event.change == CONNECTED else "left"),
            worker=event.worker,
            change=event.change,
        )
