"""
(k) The event stream (C{GET /v1/events}): events delivered a second to 1
and to 1,000 subscribers while no-op jobs run, what 10,000 idle
subscribers cost the no-op rate, and the time from a submit to its event.

The subscribers are raw sockets in this process (on the load core), read
by one thread through a selector that counts the events in what arrives
(C{bytes.count}, in C): a Python parser per subscriber would measure this
process, not the daemon.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
import uuid
from typing import Any, Optional

from bench.harness import (
    HOST,
    BenchError,
    Run,
    Server,
    Window,
    in_rounds,
    median,
    step,
    percentile,
)
from bench.measures import (
    jobs_in_state,
    parse_time,
    submit_concurrently,
    wait_all_finished,
)

# (k) 10,000 idle subscribers: the no-op rate with them, × without.
IDLE_SUBSCRIBERS_RATIO = 0.9

JOB_EVENT = b"\nevent: job\n"
DROPPED = b"event: dropped"


class Subscribers:
    """
    C{count} event streams of one daemon, opened a chunk at a time (each
    chunk's heads read before the next connects), closed with a reset.
    With L{start_reading}, a thread reads them all and counts their job
    events, until L{stop_reading}.
    """

    def __init__(self, server: Server, count: int, query: str = "", chunk: int = 250) -> None:
        self.server = server
        self.count = count
        self.query = query
        self.chunk = chunk
        self.sockets: list[socket.socket] = []
        self.events: dict[int, int] = {}
        self.dropped: set[int] = set()
        self.last_event_at: Optional[float] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.open_s: Optional[float] = None

    def __enter__(self) -> "Subscribers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self, timeout: float = 120.0) -> None:
        """
        Open them all; each must answer 200 and its first comment.
        """
        t0 = time.monotonic()
        request = (f"GET /v1/events{self.query} HTTP/1.1\r\nHost: {HOST}\r\n"
                   f"Authorization: Bearer {self.server.token}\r\n\r\n").encode("ascii")
        while len(self.sockets) < self.count:
            if time.monotonic() - t0 > timeout:
                raise BenchError(f"opened only {len(self.sockets)} of {self.count} "
                                 "event streams in time")
            chunk = []
            for _ in range(min(self.chunk, self.count - len(self.sockets))):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.settimeout(30)
                s.connect((HOST, self.server.port))
                self.sockets.append(s)
                chunk.append(s)
            for s in chunk:
                s.sendall(request)
            for s in chunk:
                data = b""
                while b": events\n\n" not in data:
                    more = s.recv(65536)
                    if not more:
                        raise BenchError(f"an event stream closed at once: {data[:300]!r}")
                    data += more
                if not data.startswith(b"HTTP/1.1 200"):
                    raise BenchError(f"an event stream was refused: {data[:300]!r}")
        self.open_s = time.monotonic() - t0

    def start_reading(self) -> None:
        """
        Read every stream from now on, in a thread, counting job events.
        """
        self.events = {i: 0 for i in range(len(self.sockets))}
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        selector = selectors.DefaultSelector()
        tails: dict[int, bytes] = {}
        for i, s in enumerate(self.sockets):
            s.setblocking(False)
            selector.register(s, selectors.EVENT_READ, i)
        while not self._stop.is_set():
            for key, _ in selector.select(0.1):
                i = key.data
                try:
                    data = key.fileobj.recv(1 << 20)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                # An event's marker may straddle two reads.
                text = tails.get(i, b"") + data
                found = text.count(JOB_EVENT)
                if found:
                    self.events[i] += found
                    self.last_event_at = time.time()
                if DROPPED in text:
                    self.dropped.add(i)
                tails[i] = text[-(len(JOB_EVENT) - 1):]
        selector.close()

    def total(self) -> int:
        """
        Job events read so far, over every stream.
        """
        return sum(self.events.values())

    def wait_for(self, each: int, deadline: float) -> None:
        """
        Until every stream has read C{each} job events or was dropped.
        """
        while time.monotonic() < deadline:
            if all(n >= each or i in self.dropped for i, n in self.events.items()):
                return
            time.sleep(0.05)

    def stop_reading(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def close(self) -> None:
        self.stop_reading()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()
        self.sockets = []


def measure_delivery(run: Run, name: str, subscribers: int, jobs: int,
                     timeout: float = 300.0) -> dict[str, Any]:
    """
    (k) C{subscribers} unfiltered streams open while C{jobs} no-op task
    jobs are submitted by 50 client threads and run (slots = threads = 8):
    how many job events reached them a second, in all and each, from the
    first submit to the last event read; how many were dropped.  Each job
    makes three events (queued, running, succeeded).
    """
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(Server(run.processes, "daemon", run.tmp / name,
                                            slots=8, threads=8))
        subs = stack.enter_context(Subscribers(server, subscribers))
        subs.open()
        subs.start_reading()
        with Window(run, server, name):
            deadline = time.monotonic() + timeout
            first = time.time()
            submit_concurrently(server.client, lambda i: {"task": "noop"}, jobs, 50, deadline)
            wait_all_finished(server.client, deadline, 0.1)
            subs.wait_for(3 * jobs, deadline)
            last = subs.last_event_at or time.time()
            subs.stop_reading()
        finished = [parse_time(j["finished_at"]) for j in jobs_in_state(server.client,
                                                                          "succeeded")]
        memory = server.memory()
    if len(finished) != jobs:
        raise BenchError(f"{name}: {len(finished)} of {jobs} succeeded")
    delivered = subs.total()
    elapsed = last - first
    per = sorted(subs.events.values())
    return {
        "subscribers": subscribers,
        "jobs": jobs,
        "events_made": 3 * jobs,
        "events_delivered": delivered,
        "events_per_s": round(delivered / elapsed, 1),
        "events_per_s_each_median": round(median(per) / elapsed, 1),
        "dropped": len(subs.dropped),
        "jobs_per_s": round(jobs / (max(finished) - first), 1),
        "elapsed_s": round(elapsed, 3),
        "open_s": round(subs.open_s or 0.0, 2),
        "memory": memory,
    }


def measure_idle_subscribers(run: Run, name: str, idle: int, jobs: int,
                             timeout: float = 300.0) -> dict[str, Any]:
    """
    (k) C{jobs} no-op task jobs end to end, as (b), with C{idle} streams
    open, each following a job that never exists (C{?job=<a random id>}):
    clients waiting on their own jobs, which these jobs are not.
    """
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(Server(run.processes, "daemon", run.tmp / name,
                                            slots=8, threads=8))
        subs = stack.enter_context(Subscribers(server, idle, f"?job={uuid.uuid4()}"))
        if idle:
            subs.open()
        memory_idle = server.memory()
        with Window(run, server, name) as window:
            deadline = time.monotonic() + timeout
            first = time.time()
            submit_concurrently(server.client, lambda i: {"task": "noop"}, jobs, 50, deadline)
            wait_all_finished(server.client, deadline, 0.1)
        finished = [parse_time(j["finished_at"]) for j in jobs_in_state(server.client,
                                                                          "succeeded")]
        memory = server.memory()
        still = sum(1 for s in subs.sockets if _open(s))
    if len(finished) != jobs:
        raise BenchError(f"{name}: {len(finished)} of {jobs} succeeded")
    return {
        "subscribers": idle,
        "jobs": jobs,
        "jobs_per_s": round(jobs / (max(finished) - first), 1),
        "open_s": round(subs.open_s or 0.0, 2),
        "still_open": still,
        "memory_with_subscribers": memory_idle,
        "memory": memory,
        **window.figures,
    }


def _open(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        data = s.recv(1 << 16, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return bool(data)


def measure_latency(run: Run, name: str, count: int, timeout: float = 120.0) -> dict[str, Any]:
    """
    (k) Submit to event: C{count} no-op task jobs submitted one at a time,
    each once the one before has succeeded, while one stream is open and
    read by its own thread; for each job, the time from sending its submit
    to reading its C{queued} event, and its C{succeeded} event.
    """
    arrivals: dict[tuple[bytes, bytes], float] = {}
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(Server(run.processes, "daemon", run.tmp / name,
                                            slots=8, threads=8))
        s = socket.create_connection((HOST, server.port))
        stack.callback(s.close)
        s.sendall((f"GET /v1/events HTTP/1.1\r\nHost: {HOST}\r\n"
                   f"Authorization: Bearer {server.token}\r\n\r\n").encode("ascii"))
        stop = threading.Event()

        def read() -> None:
            buffer = b""
            s.settimeout(0.2)
            while not stop.is_set():
                try:
                    data = s.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    return
                now = time.perf_counter()
                buffer += data
                *blocks, buffer = buffer.split(b"\n\n")
                for block in blocks:
                    at = block.find(b'"job_id":"')
                    if at < 0:
                        continue
                    job_id = block[at + 10:at + 46]
                    state = block.split(b'"state":"', 1)[1].split(b'"', 1)[0]
                    arrivals[(job_id, state)] = now

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        stack.callback(reader.join, 5)
        stack.callback(stop.set)
        sent: dict[bytes, float] = {}
        with Window(run, server, name):
            deadline = time.monotonic() + timeout
            for _ in range(count):
                t = time.perf_counter()
                status, job = server.client.json("POST", "/v1/jobs", {"task": "noop"})
                if status != 201:
                    raise BenchError(f"submit answered {status}: {job}")
                key = job["id"].encode("ascii")
                sent[key] = t
                while (key, b"succeeded") not in arrivals:
                    if time.monotonic() > deadline:
                        raise BenchError(f"{name}: no succeeded event for {job['id']}")
                    time.sleep(0.0005)
    queued = [(arrivals[(k, b"queued")] - t) * 1000 for k, t in sent.items()]
    succeeded = [(arrivals[(k, b"succeeded")] - t) * 1000 for k, t in sent.items()]
    return {
        "jobs": count,
        "to_queued_ms": {"p50": round(percentile(queued, 50), 2),
                         "p99": round(percentile(queued, 99), 2)},
        "to_succeeded_ms": {"p50": round(percentile(succeeded, 50), 2),
                            "p99": round(percentile(succeeded, 99), 2)},
    }


def take_event_measures(run: Run, settings: dict[str, Any], measures: dict[str, Any]) -> None:
    """
    Every measure of (k), into C{measures}: the idle subscribers' cost in
    rounds alternating with none, delivery to 1 and to many, the latency.
    """
    jobs = settings["event_jobs"]
    idle = settings["idle_subscribers"]
    in_rounds(measures, settings["event_rounds"], [
        ("noop_tasks_subscribers_none",
         lambda n: measure_idle_subscribers(run, f"events-idle-none-{n}", 0, jobs)),
        ("noop_tasks_subscribers_idle",
         lambda n: measure_idle_subscribers(run, f"events-idle-{idle}-{n}", idle, jobs)),
    ], "jobs_per_s", alternate=True)
    for count in (1, settings["busy_subscribers"]):
        step(measures, f"events_delivered_{count}",
             lambda count=count: measure_delivery(run, f"events-delivered-{count}", count,
                                                  settings["delivery_jobs"]))
    step(measures, "events_latency",
         lambda: measure_latency(run, "events-latency", settings["event_latency_jobs"]))
