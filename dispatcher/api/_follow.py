"""
Following a log: C{GET /v1/jobs/{id}/log?follow=true} sends one stream of
one attempt as it is written, and ends once that attempt has ended and the
last byte of it is out.

Who writes a log: on this host, the spawner helper (pipes moved to the
files, with a log cap) or the job's own processes (without one), both
other processes; for a remote worker's job, this daemon itself, as the
worker's chunks arrive (L{dispatcher.api._workers}).  New bytes are
noticed two ways:

  - a shared timer (L{POLL_INTERVAL}) that, while some follower has sent
    all there was and its client takes more, looks at the sizes of all
    such followers' files in one trip to the I/O pool;
  - the remote chunks' writer, which says at once what it wrote
    (L{LogFollowers.written}), so a worker's bytes go out without waiting
    for the timer.

Why a timer rather than inotify: it sees what any process writes, on any
file system (inotify misses writes made on another host of a network file
system, and costs a kernel watch per file, bounded per user by
C{fs.inotify.max_user_watches}); its cost is bounded by the followers and
the interval, never by how fast a job writes (an event per write of a
chatty job is a reactor wake-up per write); and it needs nothing the
platform may lack.  Its cost, measured with 1,000 followers waiting on
1,000 files: see C{bench/follow_logs.py} and the README.

When an attempt ends is learnt from the dispatcher's job events: an event
for a followed job makes the job be read again from the store (once for
all its followers), and an attempt with an end, or a job that has moved
on, has ended.  Its file is then looked at once more and sent to that
size: the spawner helper has moved the last of the pipes to the file
before it reports the exit, and a remote worker ships its last bytes
before it reports the result.  Each followed job is also read again every
L{REFRESH_INTERVAL} seconds, so that no missed event can hold a follow
open for ever.

Files are read on the I/O pool, a chunk (L{CHUNK}) at a time, only while
the client takes what is sent: the follower is the response's push
producer, paused while the connection's send buffer is full, so a client
that stops reading holds at most a chunk and the transport's buffer.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dispatcher.model._jobs import JobState, StoreClosed, UnknownJob
from dispatcher.wire._submission import ApiError

log = Logger()

# Seconds between two looks at the sizes of the files followers wait on:
# how late a byte written on this host may reach a follower.
POLL_INTERVAL = 0.25
# Seconds after which a followed job is read again from the store even
# without an event for it.
REFRESH_INTERVAL = 15.0
# The most bytes read (and held) for one follower at a time.
CHUNK = 65536
# A principal may hold this share of [api] max_log_followers.
PER_PRINCIPAL_SHARE = 4
# Seconds a refused follower is told to wait (Retry-After).
RETRY_AFTER = 5

# The states in which a job's latest attempt is under way.
_UNDER_WAY = frozenset({JobState.STAGING, JobState.RUNNING})


def file_size(path: str) -> int:
    """
    The size of the file at C{path}; 0 if there is none (yet, or any
    more).  Blocks: run it on the I/O pool.
    """
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def file_sizes(paths: list[str]) -> list[int]:
    """
    L{file_size} of each of C{paths}, in one trip to the I/O pool.
    """
    return [file_size(path) for path in paths]


def read_region(path: str, offset: int, size: int) -> bytes:
    """
    Up to C{size} bytes of the file at C{path} from C{offset}; none if the
    file is gone (its job was removed meanwhile: DELETE, retention).
    Blocks: run it on the I/O pool.
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return b""
    with f:
        f.seek(offset)
        return f.read(size)


def read_regions(pieces: list[tuple[str, int, int]]) -> list[bytes]:
    """
    L{read_region} of each C{(path, offset, size)}, in one trip to the I/O
    pool.
    """
    return [read_region(path, offset, size) for path, offset, size in pieces]


def too_many_followers(limit: int, mine: bool) -> ApiError:
    """
    The 503 of a follow over the bound: all of it (C{[api]
    max_log_followers}), or the caller's share of it.
    """
    whose = (
        f"this credential follows {limit // PER_PRINCIPAL_SHARE} logs already (a "
        f"quarter of [api] max_log_followers = {limit})"
        if mine
        else f"the dispatcher serves {limit} log follows already ([api] max_log_followers)"
    )
    error = ApiError(
        503, "too_many_followers",
        f"follow: {whose}; end one, read without follow (poll with offset), or try "
        f"again in {RETRY_AFTER} seconds",
        "follow",
    )
    error.headers = {b"retry-after": str(RETRY_AFTER).encode("ascii")}
    return error


class LogFollowers:
    """
    Every follow of one daemon's API: their bound, the shared timer that
    looks at the sizes of their files, and the job events that end them.

    @param run_blocking: C{(f, *args) -> Deferred} of C{f(*args)} run off
        the reactor thread (on the I/O pool).
    @param clock: the timer's clock.
    @param subscribe: C{(callback) -> unsubscribe}: the dispatcher's job
        events (L{dispatcher.core._events.JobEvents.subscribe}); subscribed
        to only while someone follows.
    @param get_job: C{job_id -> Deferred[Job]}, from the store.
    @param log_path: C{(job_id, attempt, stream) -> path}.
    @param max_followers: C{[api] max_log_followers}.
    """

    def __init__(
        self,
        run_blocking: Callable[..., Deferred],
        clock: Any,
        subscribe: Callable[[Callable[[Any], None]], Callable[[], None]],
        get_job: Callable[[str], Deferred],
        log_path: Callable[[str, int, str], str],
        max_followers: int,
    ) -> None:
        self._run = run_blocking
        self._clock = clock
        self._subscribe = subscribe
        self._unsubscribe: Optional[Callable[[], None]] = None
        self._get_job = get_job
        self.log_path = log_path
        self.max_followers = max_followers
        # Followers by job, and how many each principal holds.
        self._by_job: dict[str, set[LogFollower]] = {}
        self._by_principal: dict[str, int] = {}
        self.count = 0
        # Those that sent all there was and wait for more, while their
        # client takes it; the timer runs while there are any.
        self._waiting: set[LogFollower] = set()
        self._timer: Any = None
        self._polling = False
        # When each followed job was last read; jobs being read now.
        self._read_at: dict[str, float] = {}
        self._reading: set[str] = set()
        self._stopped = False

    def check_room(self, principal: str) -> None:
        """
        Refuse (503 C{too_many_followers}) a follow over the bound.
        """
        if self._stopped:
            raise ApiError(503, "shutting_down", "the dispatcher is stopping; try again")
        if self.count >= self.max_followers:
            raise too_many_followers(self.max_followers, False)
        share = max(1, self.max_followers // PER_PRINCIPAL_SHARE)
        if self._by_principal.get(principal, 0) >= share:
            raise too_many_followers(self.max_followers, True)

    def follow(
        self,
        request: Any,
        job: Any,
        attempt: Optional[int],
        stream: str,
        offset: int,
        principal: str,
    ) -> "LogFollower":
        """
        Start sending C{stream} of C{job}'s attempt C{attempt} (C{None}:
        its latest, or its first once it starts) to C{request} from
        C{offset}, as it is written.
        """
        self.check_room(principal)
        follower = LogFollower(self, request, job.id, attempt, stream, offset, principal)
        self._by_job.setdefault(job.id, set()).add(follower)
        self._by_principal[principal] = self._by_principal.get(principal, 0) + 1
        self.count += 1
        if self._unsubscribe is None:
            self._unsubscribe = self._subscribe(self._job_changed)
        follower.start()
        # What happened between the handler's read of the job and this
        # subscription is seen by reading it again.
        follower.job_seen(job)
        self._refresh(job.id)
        return follower

    def written(self, job_id: str, attempt: int, stream: str, size: int) -> None:
        """
        The remote chunks' writer wrote C{stream} of C{job_id}'s attempt
        C{attempt} up to C{size} bytes: its followers send them now.
        """
        for follower in list(self._by_job.get(job_id, ())):
            if follower.attempt == attempt and follower.stream == stream:
                follower.grew(size)

    def stop(self) -> None:
        """
        End every follow now (the daemon stops): each connection is closed
        without the answer's last chunk, so its client knows the attempt
        did not end there and can ask again, with C{offset}, once the
        daemon is back.
        """
        self._stopped = True
        for followers in list(self._by_job.values()):
            for follower in list(followers):
                follower.abort()
        self._stop_timer()

    # The followers' calls

    def _gone(self, follower: "LogFollower") -> None:
        followers = self._by_job.get(follower.job_id)
        if followers is None or follower not in followers:
            return
        followers.discard(follower)
        if not followers:
            del self._by_job[follower.job_id]
            self._read_at.pop(follower.job_id, None)
        left = self._by_principal[follower.principal] - 1
        if left:
            self._by_principal[follower.principal] = left
        else:
            del self._by_principal[follower.principal]
        self.count -= 1
        self._waiting.discard(follower)
        if not self._waiting:
            self._stop_timer()
        if not self.count and self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _wait(self, follower: "LogFollower") -> None:
        self._waiting.add(follower)
        if self._timer is None and not self._polling and not self._stopped:
            self._timer = self._clock.callLater(POLL_INTERVAL, self._poll)

    def _unwait(self, follower: "LogFollower") -> None:
        self._waiting.discard(follower)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # The shared timer

    def _poll(self) -> None:
        """
        Look at the sizes of the files followers wait on, in one trip to
        the I/O pool; and read again the followed jobs not read for
        L{REFRESH_INTERVAL} seconds.
        """
        self._timer = None
        now = self._clock.seconds()
        for job_id in [j for j, at in self._read_at.items() if now - at >= REFRESH_INTERVAL]:
            self._refresh(job_id)
        waiting = [f for f in self._waiting if f.path is not None]
        if not waiting:
            self._rearm()
            return
        paths = list({f.path for f in waiting})
        self._polling = True
        d = self._run(file_sizes, paths)

        def looked(sizes: list[int]) -> Optional[Deferred]:
            # What the files gained is read in one more trip for all the
            # followers it concerns, not a trip each.
            by_path = dict(zip(paths, sizes))
            reads = []
            for follower in waiting:
                size = by_path.get(follower.path, 0)
                if size > follower.size:
                    follower.size = size
                    wanted = follower.take_read()
                    if wanted is not None:
                        reads.append((follower, wanted))
            if not reads:
                return None
            got = self._run(read_regions, [piece for _, piece in reads])

            def deliver(chunks: list[bytes]) -> None:
                for (follower, _), data in zip(reads, chunks):
                    follower.got(data)

            def failed_reads(failure: Failure) -> None:
                for follower, _ in reads:
                    follower.failed(failure)

            return got.addCallbacks(deliver, failed_reads)

        def failed(failure: Failure) -> None:
            log.failure("looking at the sizes of followed logs failed", failure)

        d.addCallbacks(looked, failed)
        d.addBoth(self._polled)

    def _polled(self, _: Any) -> None:
        self._polling = False
        self._rearm()

    def _rearm(self) -> None:
        if self._waiting and self._timer is None and not self._stopped:
            self._timer = self._clock.callLater(POLL_INTERVAL, self._poll)

    # Job events

    def _job_changed(self, event: Any) -> None:
        # One dictionary look-up for each job event while someone follows:
        # the no-op job path pays nothing more.
        if event.job_id in self._by_job:
            self._refresh(event.job_id)

    def _refresh(self, job_id: str) -> None:
        """
        Read C{job_id} again, once for all its followers (an event that
        comes while it is read makes it be read once more after).
        """
        if job_id in self._reading:
            self._read_at[job_id] = float("-inf")
            return
        self._reading.add(job_id)
        self._read_at[job_id] = self._clock.seconds()

        def seen(job: Any) -> None:
            for follower in list(self._by_job.get(job_id, ())):
                follower.job_seen(job)

        def failed(failure: Failure) -> None:
            if failure.check(UnknownJob):
                # Removed (a DELETE, retention): its log is gone too.
                for follower in list(self._by_job.get(job_id, ())):
                    follower.abort()
            elif not failure.check(StoreClosed):
                log.failure("reading followed job {job_id} failed", failure, job_id=job_id)

        def done(_: Any) -> None:
            self._reading.discard(job_id)
            if job_id in self._by_job and self._read_at.get(job_id) == float("-inf"):
                self._refresh(job_id)

        d = self._get_job(job_id)
        d.addCallbacks(seen, failed)
        d.addBoth(done)


@implementer(IPushProducer)
class LogFollower:
    """
    One follow: a response that sends an attempt's stream as the file
    grows, paused while its client does not take it.

    @ivar attempt: the attempt followed; C{None} until the job's first
        starts (a follow of a job without one waits for it).
    @ivar path: its file, once the attempt is known.
    @ivar offset: the next byte to send.
    @ivar size: how far the file is known to reach.
    @ivar end: the file's size once the attempt has ended (then the answer
        ends there); C{None} while it runs.
    """

    def __init__(
        self,
        followers: LogFollowers,
        request: Any,
        job_id: str,
        attempt: Optional[int],
        stream: str,
        offset: int,
        principal: str,
    ) -> None:
        self._followers = followers
        self._request = request
        self.job_id = job_id
        self.attempt = attempt
        self.stream = stream
        self.principal = principal
        self.path: Optional[str] = None
        if attempt is not None:
            self.path = followers.log_path(job_id, attempt, stream)
        self.offset = offset
        self.size = 0
        self.end: Optional[int] = None
        self._ended = False
        self._paused = False
        self._busy = False
        self.done = False

    def start(self) -> None:
        request = self._request
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        # The head goes now (chunked: no length), so the client knows
        # the follow has begun before the first byte is written.
        request.registerProducer(self, True)
        request.write(b"")
        request.when_lost(self._lost)

    # What is learnt

    def job_seen(self, job: Any) -> None:
        """
        The job as the store has it now: the attempt to follow, once it
        has one, and whether that attempt has ended.
        """
        if self.done:
            return
        if self.attempt is None:
            if job.attempts:
                self.attempt = job.attempts[-1].number
                self.path = self._followers.log_path(self.job_id, self.attempt, self.stream)
            elif job.state.final:
                # Cancelled (or failed) before any attempt: no log will come.
                self._ended = True
                self.end = 0
                self._step()
                return
            else:
                return
        if self._ended:
            return
        attempt = next((a for a in job.attempts if a.number == self.attempt), None)
        if (
            attempt is None
            or attempt.finished_at is not None
            or job.state not in _UNDER_WAY
            or job.attempts[-1].number != self.attempt
        ):
            self._ended = True
            self._settle()
        else:
            self._step()

    def grew(self, size: int) -> None:
        """
        The file is known to reach C{size} bytes.
        """
        if size > self.size:
            self.size = size
            self._step()

    # Sending

    def _settle(self) -> None:
        """
        The attempt has ended: look at its file once more; the answer ends
        at that size.
        """
        if self.path is None:
            self.end = 0
            self._step()
            return
        self._busy = True
        self._followers._unwait(self)
        d = self._followers._run(file_size, self.path)

        def sized(size: int) -> None:
            self._busy = False
            self.end = size
            self.size = max(self.size, size)
            self._step()

        d.addCallbacks(sized, self.failed)

    def _step(self) -> None:
        """
        Do what comes next: read the next chunk, end the answer, or wait
        for the file to grow.
        """
        if self.done or self._busy or self._paused:
            return
        if self.attempt is None:
            if self._ended:
                self._finish()
            return
        wanted = self.take_read()
        if wanted is not None:
            d = self._followers._run(read_region, *wanted)
            d.addCallbacks(self.got, self.failed)
            return
        if self.end is not None:
            self._finish()
        elif not self._ended:
            self._followers._wait(self)

    def take_read(self) -> Optional[tuple[str, int, int]]:
        """
        The read to make now, C{(path, offset, size)}, if there is one
        (the file holds more than was sent, and the client takes it); the
        follower is busy until L{got} or L{failed}.
        """
        if self.done or self._busy or self._paused or self.path is None:
            return None
        end = self.size if self.end is None else min(self.size, self.end)
        if self.offset >= end:
            return None
        self._busy = True
        self._followers._unwait(self)
        return self.path, self.offset, min(CHUNK, end - self.offset)

    def got(self, data: bytes) -> None:
        """
        The bytes a read (L{take_read}) gave: send them, and go on.
        """
        self._busy = False
        if self.done:
            return
        if not data:
            # Less than was seen (the remote writer counts bytes past its
            # cap that the file does not hold; a removed file): what the
            # file holds is all there is.
            self.size = self.offset
            if self.end is not None:
                self.end = self.offset
            self._step()
            return
        self.offset += len(data)
        # Writing may pause this producer (the send buffer is full): the
        # next read then waits for resumeProducing.
        self._request.write(data)
        self._step()

    def failed(self, failure: Failure) -> None:
        """
        A read failed: say so, and end the follow (its connection closed).
        """
        self._busy = False
        log.failure("following the log {path} failed", failure, path=self.path)
        self.abort()

    def _finish(self) -> None:
        self.done = True
        self._followers._gone(self)
        self._request.unregisterProducer()
        self._request.finish()

    def abort(self) -> None:
        """
        End the follow by closing its connection, without the answer's
        last chunk: its client sees that it did not reach the attempt's
        end.
        """
        if self.done:
            return
        self.done = True
        self._followers._gone(self)
        self._request.unregisterProducer()
        self._request.loseConnection()

    def _lost(self) -> None:
        # The client went: nothing more is read for it.
        self.done = True
        self._followers._gone(self)

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True
        self._followers._unwait(self)

    def resumeProducing(self) -> None:
        self._paused = False
        self._step()

    def stopProducing(self) -> None:
        self._lost()
