"""
The task pool (dispatcher._threads): results and errors on the reactor
thread, the bound on concurrent calls, batched wake-ups, and stopping.
"""

import threading

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, gatherResults
from twisted.internet.task import deferLater

from dispatcher._threads import TaskThreads


@pytest.fixture
def pool():
    pool = TaskThreads(reactor, 3, "test-tasks")
    pool.start()
    yield pool
    pool.stop_without_waiting()


@pytest_twisted.ensureDeferred
async def test_results_and_errors_come_back_on_the_reactor_thread(pool):
    seen = []

    def where(d):
        return d.addBoth(lambda r: (seen.append(threading.current_thread()), r)[1])

    assert await where(pool.defer(lambda a, b: a + b, 2, 3)) == 5
    with pytest.raises(ZeroDivisionError):
        await where(pool.defer(lambda: 1 / 0))
    assert seen == [threading.main_thread()] * 2


@pytest_twisted.ensureDeferred
async def test_at_most_size_calls_run_at_once(pool):
    """Calls beyond the pool's size wait for a free thread."""
    lock = threading.Lock()
    running = [0]
    most = [0]
    gate = threading.Event()

    def call(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        gate.wait(5)
        with lock:
            running[0] -= 1
        return i

    calls = [pool.defer(call, i) for i in range(10)]
    # The gate opens once the pool is full (three calls in), whenever that is.
    for _ in range(1000):
        with lock:
            if running[0] >= 3:
                break
        await deferLater(reactor, 0.005)
    gate.set()
    assert await gatherResults(calls) == list(range(10))
    assert most[0] == 3


@pytest_twisted.ensureDeferred
async def test_results_that_come_together_wake_the_reactor_once(pool, monkeypatch):
    """Results that arrive before the reactor collects them share one
    callFromThread."""
    wakes = []
    real = reactor.callFromThread
    monkeypatch.setattr(reactor, "callFromThread",
                        lambda f, *a: (wakes.append(f), real(f, *a)))
    calls = [pool.defer(lambda i=i: i) for i in range(5)]
    # The reactor thread is held here until all five have returned.
    finished = threading.Event()
    for _ in range(5000):
        with pool._lock:
            if len(pool._done) == 5:
                finished.set()
                break
        finished.wait(0.001)
    assert finished.is_set()
    assert await gatherResults(calls) == [0, 1, 2, 3, 4]
    assert len(wakes) == 1


def test_stop_waits_and_stop_without_waiting_does_not():
    pool = TaskThreads(reactor, 2, "test-stop")
    pool.start()
    done = []
    began = threading.Event()
    pool.defer(lambda: (began.set(), threading.Event().wait(0.05), done.append(1)))
    assert began.wait(5)
    pool.stop()  # joins: the running call finishes first
    assert done == [1]
    assert not any(t.is_alive() for t in threading.enumerate() if t.name.startswith("test-stop"))
    with pytest.raises(RuntimeError):
        pool.defer(lambda: None)

    hung = TaskThreads(reactor, 1, "test-hung")
    hung.start()
    forever = threading.Event()
    hung_began = threading.Event()
    hung.defer(lambda: (hung_began.set(), forever.wait(5)))
    assert hung_began.wait(5)
    hung.stop_without_waiting()  # returns although the call never does
    busy = [t for t in threading.enumerate() if t.name.startswith("test-hung")]
    assert busy and all(t.daemon for t in busy)
    forever.set()


@pytest_twisted.ensureDeferred
async def test_calls_not_begun_when_the_pool_stops_never_run():
    """Stopping drops the calls still waiting for a thread (their Deferreds
    fail with CancelledError); the running one finishes."""
    pool = TaskThreads(reactor, 1, "test-drop")
    pool.start()
    gate = threading.Event()
    ran = []
    running = pool.defer(lambda: (gate.wait(5), ran.append("first"))[1])
    waiting = [pool.defer(ran.append, i) for i in range(3)]
    for _ in range(5000):  # until the first call holds the thread
        if pool._calls.qsize() == 3:
            break
        threading.Event().wait(0.001)
    pool.stop_without_waiting()
    gate.set()
    for d in waiting:
        with pytest.raises(CancelledError):
            await d
    await running
    assert ran == ["first"]


def test_a_pool_needs_a_thread():
    with pytest.raises(ValueError):
        TaskThreads(reactor, 0, "none")
