"""
The recorder: the one path by which an attempt's end reaches the store,
whoever held it (this host's executor or a remote worker).

An end (or a release, or a staged job starting) is written to the store;
what the write changed is applied (events, wake-ups, claims) only once it
has committed.  An end the store could not commit (a full disk, an I/O
error) is written again, after 1 s, then 2, 4 ... up to 60 s, until it
lands: a result is never dropped because one commit failed.  Its holder
keeps the attempt in memory until then (see L{Dispatcher} and
L{WorkerHub}), so nothing is handed out or answered twice meanwhile, and
the recorder keeps what waits (L{Recorder.unrecorded}) so that the job is
shown waiting for it rather than running.  A local end the store cannot
write as it is (a value it cannot encode, which the executor's check
should have refused) is written as a failure saying why: a job is never
left running for ever because its end could not be stored.  (A remote
worker's report that fails so is answered 500, and the worker resends.)
"""

from __future__ import annotations

import functools

from typing import Any, Callable, Optional

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from dispatcher.core._reasons import end_not_recorded
from dispatcher.model._jobs import JobState, Lease, Outcome, StaleLease, StoreClosed
from dispatcher.model._values import lone_surrogate, servable_text

log = Logger()

# What a write raises for a value it cannot write (a lone surrogate, a
# key orjson and json cannot sort, a nesting deeper than they follow);
# UnicodeEncodeError is a ValueError.
UNWRITABLE = (TypeError, ValueError, OverflowError, RecursionError)

# How long after a failed commit an end is written again (doubling each
# time, up to the most).
RECORD_RETRY_FIRST = 1.0
RECORD_RETRY_MAX = 60.0


@attrs.frozen
class UnrecordedEnd:
    """
    An attempt's end that failed to commit and waits to be written again.

    @ivar attempt: the attempt's number.
    @ivar ended: the state it ended in, or C{None}: it was given back.
    @ivar at: when it ended.
    @ivar error: why its last commit failed.
    @ivar retry_at: when it is written again (C{None}: it is being written).
    """

    attempt: int
    ended: Optional[JobState]
    at: float
    error: str
    retry_at: Optional[float]

    @property
    def wait_reason(self) -> str:
        """
        What the job is shown waiting for meanwhile.
        """
        return end_not_recorded(self.ended, self.at, self.error, self.retry_at)


class _Write:
    """
    One write of an attempt's end: the store operation, its arguments, and
    the wait before it is tried again if it fails to commit.
    """

    __slots__ = ("operation", "args", "lease", "delay", "ended", "at", "replaced")

    def __init__(
        self,
        operation: Callable[..., Deferred],
        args: tuple[Any, ...],
        lease: Lease,
        ended: Optional[JobState],
        at: float,
    ) -> None:
        self.operation = operation
        self.args = args
        self.lease = lease
        self.delay: Optional[float] = None
        self.ended = ended
        self.at = at
        # Whether an end the store could not write as it was is now
        # written as failed instead (or may not be: it is not final).
        self.replaced = False


class Recorder:
    """
    Writes how attempts end, writes again what failed to commit, and applies
    what was written once it has committed.

    @param store: the L{IJobStore}.
    @param clock: the C{IReactorTime} the waits before writing again run on.
    @param applied: told of every L{Written} that committed, before the
        caller hears of it (the dispatcher publishes its events, wakes
        pending jobs and claims for what it queued).
    @param retry_on: the failures of a write that are the store's (its disk,
        its database): an end that fails with one is written again while
        the recorder runs; any other failure is final.
    @ivar retry_first: the first wait before writing a failed end again.
    @ivar retry_max: the longest wait.
    @ivar unrecorded: by job id, the L{UnrecordedEnd} of every end that
        failed to commit and has not landed since.
    """

    def __init__(
        self,
        store: Any,
        clock: Any,
        applied: Callable[[Any], None],
        retry_on: tuple[type[BaseException], ...],
        retry_first: float = RECORD_RETRY_FIRST,
        retry_max: float = RECORD_RETRY_MAX,
    ) -> None:
        self._store = store
        self._clock = clock
        self._applied = applied
        self._retry_on = retry_on
        self.retry_first = retry_first
        self.retry_max = retry_max
        self._running = True
        # The ends waiting to be written again, and the timers that will.
        self._waits: dict[Deferred, Any] = {}
        self.unrecorded: dict[str, UnrecordedEnd] = {}

    @property
    def waiting(self) -> int:
        """
        How many ends failed to commit and wait to be written again.
        """
        return len(self._waits)

    def start(self) -> None:
        """
        Write failed ends again from now on (the default).
        """
        self._running = True

    def stop(self) -> None:
        """
        Give up the ends that wait to be written again (each fails with
        L{StoreClosed}), and write none again from now on.  A write under
        way finishes.
        """
        self._running = False
        self.unrecorded.clear()
        for again, call in list(self._waits.items()):
            del self._waits[again]
            call.cancel()
            again.errback(StoreClosed("the dispatcher stopped before the end was recorded"))

    def write_waiting_now(self) -> None:
        """
        Write every end that waits to be written again now, not at the end
        of its back-off: the store answers again (the dispatcher's lease
        renewal landed after failing), and a killed job's slot should not
        wait up to a minute for its release to land.
        """
        for call in list(self._waits.values()):
            if call.active():
                call.reset(0)

    # What holders ask

    def finish(
        self,
        lease: Lease,
        outcome: Outcome,
        now: float,
        final: bool = False,
        server: Optional[str] = None,
    ) -> Deferred:
        """
        Record that the attempt of C{lease} ended with C{outcome} at C{now}.
        Fires with the L{Written} once it has committed and been applied;
        fails with L{StaleLease} if the lease is no longer current, with
        L{StoreClosed} if the dispatcher stopped first, or with a failure
        that is not the store's.

        @param final: no one can report this end again (this host's
            executor; a remote worker resends): an end the store cannot
            write as it is (L{UNWRITABLE}) is written as a failure saying
            why instead, rather than leave the job running for ever.
        @param server: written only if this dispatcher (its holder name)
            still serves the lease (L{IJobStore.finish_served}): a remote
            lease's expiry on a database shared with other dispatchers.
        """
        error = outcome.error
        if error is not None and lone_surrogate(error) is not None:
            outcome = attrs.evolve(outcome, error=servable_text(error))
        write = self._store.finish
        if server is not None:
            write = functools.partial(self._store.finish_served, server=server)
        ending = _Write(write, (lease, outcome, now), lease, outcome.state, now)
        ending.replaced = not final
        return self._follow(write(lease, outcome, now), ending)

    def release(self, lease: Lease, now: float, reason: str) -> Deferred:
        """
        Give the attempt of C{lease} up unspent, for C{reason}; fires (or
        fails) as L{finish} does.
        """
        write = self._store.release
        return self._follow(
            write(lease, now, reason), _Write(write, (lease, now, reason), lease, None, now)
        )

    def mark_running(self, lease: Lease, now: float) -> Deferred:
        """
        The staged job of C{lease} has started.  Fires with the L{Written}
        once applied; a failure is the caller's (the job runs either way,
        and its end is what must land).
        """
        return self._store.mark_running(lease, now).addCallback(self._landed)

    # Following a write

    def _follow(self, d: Deferred, write: _Write) -> Deferred:
        return d.addCallbacks(self._landed, self._failed, errbackArgs=(write,))

    def _landed(self, written: Any) -> Any:
        self._applied(written)
        return written

    def _landed_again(self, written: Any, write: _Write) -> Any:
        self._forget(write)
        self._applied(written)
        return written

    def _forget(self, write: _Write) -> None:
        lease = write.lease
        waiting = self.unrecorded.get(lease.job_id)
        if waiting is not None and waiting.attempt == lease.attempt:
            del self.unrecorded[lease.job_id]

    def _failed(self, failure: Failure, write: _Write) -> Any:
        if not failure.check(*self._retry_on) or not self._running:
            self._forget(write)
        lease = write.lease
        if failure.check(StaleLease):
            log.info(
                "job {job_id} attempt {attempt} ended on a lease that is no "
                "longer current; its result is dropped",
                job_id=lease.job_id,
                attempt=lease.attempt,
            )
            return failure
        if failure.check(StoreClosed):
            log.warn(
                "the end of job {job_id} attempt {attempt} was not recorded "
                "before the dispatcher stopped; the next start settles it (an "
                "attempt that ran here is recorded as lost, a worker's lease "
                "resumes and its worker reports again)",
                job_id=lease.job_id,
                attempt=lease.attempt,
            )
            return failure
        if (
            write.ended is not None
            and not write.replaced
            and self._running
            and failure.check(*UNWRITABLE)
            and not failure.check(*self._retry_on)
        ):
            # Not the store's trouble but the end's: a value it could not
            # write (the executor checks a result before it gets here; this
            # is the last line).  The attempt is recorded as failed, saying
            # why, rather than the job left running for ever.
            log.failure(
                "job {job_id} attempt {attempt} ended {state}, which could not be "
                "recorded; it is recorded as failed",
                failure,
                job_id=lease.job_id,
                attempt=lease.attempt,
                state=write.ended.value,
            )
            lease, outcome, now = write.args
            write.args = (lease, _unrecordable(outcome, failure), now)
            write.ended = JobState.FAILED
            write.replaced = True
            return self._follow(write.operation(*write.args), write)
        if not failure.check(*self._retry_on) or not self._running:
            log.failure(
                "recording the end of job {job_id} attempt {attempt} failed",
                failure,
                job_id=lease.job_id,
                attempt=lease.attempt,
            )
            return failure
        delay = self.retry_first if write.delay is None else write.delay
        write.delay = min(self.retry_max, delay * 2)
        log.warn(
            "recording the end of job {job_id} attempt {attempt} failed "
            "({error}); trying again in {delay:g} s",
            job_id=lease.job_id,
            attempt=lease.attempt,
            error=failure.getErrorMessage(),
            delay=delay,
        )
        self.unrecorded[lease.job_id] = UnrecordedEnd(
            lease.attempt,
            write.ended,
            write.at,
            failure.getErrorMessage(),
            self._clock.seconds() + delay,
        )
        again: Deferred = Deferred()
        self._waits[again] = self._clock.callLater(delay, self._write_again, again, write)
        return again.addCallbacks(
            self._landed_again, self._failed, callbackArgs=(write,), errbackArgs=(write,)
        )

    def _write_again(self, again: Deferred, write: _Write) -> None:
        del self._waits[again]
        waiting = self.unrecorded.get(write.lease.job_id)
        if waiting is not None and waiting.attempt == write.lease.attempt:
            self.unrecorded[write.lease.job_id] = attrs.evolve(waiting, retry_at=None)
        write.operation(*write.args).chainDeferred(again)


def _unrecordable(outcome: Outcome, failure: Failure) -> Outcome:
    """
    The failed outcome recorded for an end that could not be written as it
    was, saying why.
    """
    return Outcome(
        JobState.FAILED,
        exit_code=outcome.exit_code,
        error=servable_text(
            f"its end ({outcome.state.value}) could not be recorded: "
            f"{failure.type.__name__}: {failure.getErrorMessage()}"
        ),
        stopped=outcome.stopped,
    )
