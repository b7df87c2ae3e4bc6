"""
Self-fencing workers end to end (issue 14, finding 2): a real `twistd -n
dispatcher` and real `dispatcher worker` processes, one of them frozen with
SIGSTOP or cut off by a TCP proxy that black-holes its traffic, while its job
runs on.  Each job keeps a ledger: it holds an exclusive flock on a file while
it runs and writes "overlap" when it finds the lock already held, so a job run
twice at once shows.

Leases last 4 s here with a 2 s fence margin: a worker that hears nothing
kills its job 2 s after it sent its last acknowledged heartbeat, at least 2 s
before the dispatcher can hand the job to another worker.
"""

import signal
import socket
import threading
import time

import pytest

from .conftest import TEST_TASKS
from .test_remote import get, poll, pure_twistd, read_pid, submit
from .test_remote import start_worker  # noqa: F401 (a fixture)
from .test_twistd import alive

LEASE_SECONDS = 4
FENCE_MARGIN = 2


# Workers with a short kill grace, so that a fenced job dies quickly.
FENCE_INI = TEST_TASKS + "\n[executor]\nkill_grace = 0.5\n"


@pytest.fixture
def dispatcher(tmp_path, token_file):
    """A started twistd dispatcher that runs nothing itself and gives
    workers 4 s leases with a 2 s fence margin; killed at teardown."""
    daemon = pure_twistd(
        tmp_path, token_file,
        f"lease_seconds = {LEASE_SECONDS}\nfence_margin = {FENCE_MARGIN}\n")
    yield daemon
    daemon.stop()


def ledger_job(tmp_path):
    """A job that holds an exclusive flock on a file while it runs, writes
    "overlap N" to the ledger when attempt N finds it held, "start N" and
    "end N" around its work, and its pid to pids/N.  The first attempt runs
    for a minute, the others a moment."""
    ledger = tmp_path / "ledger"
    pids = tmp_path / "pids"
    pids.mkdir()
    script = (
        f'exec 9>>{ledger}.lock; '
        f'flock -n 9 || {{ echo "overlap $DISPATCHER_ATTEMPT" >> {ledger}; flock 9; }}; '
        f'echo "start $DISPATCHER_ATTEMPT" >> {ledger}; '
        f'echo $$ > {pids}/$DISPATCHER_ATTEMPT; '
        'if [ "$DISPATCHER_ATTEMPT" = 1 ]; then sleep 60; else sleep 0.3; fi; '
        f'echo "end $DISPATCHER_ATTEMPT" >> {ledger}'
    )
    body = {"command": ["sh", "-c", script], "max_attempts": 3, "retry_delay": 0}
    return body, ledger, pids


def run_first_attempt_on(dispatcher, start_worker, tmp_path, url, name):
    """Start worker C{name} (through C{url}), give it the ledger job, and
    wait until the job runs there; then start a second worker for the next
    attempt.  Return the job, the two workers, the ledger, the pids
    directory and the first attempt's pid."""
    first = start_worker(url, name, ini=FENCE_INI)
    body, ledger, pids = ledger_job(tmp_path)
    job = submit(dispatcher, body)
    pid = read_pid(pids / "1")
    assert get(dispatcher, job["id"])["worker"] == name
    second = start_worker(dispatcher.url, "spare", ini=FENCE_INI)
    return job, first, second, ledger, pids, pid


def no_overlap(ledger):
    """The ledger's lines, once it shows no attempt ran beside another."""
    lines = ledger.read_text().splitlines()
    assert not [line for line in lines if line.startswith("overlap")], lines
    return lines


def test_a_frozen_worker_kills_its_job_before_the_dispatcher_hands_it_on(
        dispatcher, start_worker, tmp_path):
    """A worker whose main process is stopped (SIGSTOP) for longer than a
    lease while its job runs on: its spawner helper kills the job at the
    worker's fence, before the dispatcher re-leases the job; a second worker
    runs attempt 2 without ever finding attempt 1 still running; and the
    first worker, continued, says it stopped the job and reports the
    attempt (refused, its lease having expired)."""
    job, first, second, ledger, pids, pid = run_first_attempt_on(
        dispatcher, start_worker, tmp_path, dispatcher.url, "frozen")
    first.process.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        poll(lambda: not alive(pid), timeout=10, what="the first attempt to be killed")
        # Killed while its worker is frozen, and before the job moved on.
        assert [a["holder"] for a in get(dispatcher, job["id"])["attempts"]] == ["frozen"]
        poll(lambda: (pids / "2").exists(), timeout=15, what="attempt 2 to start")
        assert get(dispatcher, job["id"])["worker"] == "spare"
        # Frozen past the lease's life.
        poll(lambda: time.monotonic() - stopped > LEASE_SECONDS + 1, what="a lease's life")
    finally:
        first.process.send_signal(signal.SIGCONT)
    done = dispatcher.wait(job["id"], ("succeeded", "failed", "cancelled"))
    assert done["state"] == "succeeded", (done, first.output(), second.output())
    assert [a["holder"] for a in done["attempts"]] == ["frozen", "spare"]
    assert "sent no heartbeat" in done["attempts"][0]["error"]
    assert no_overlap(ledger) == ["start 1", "start 2", "end 2"]
    said = poll(lambda: f"job {job['id']} attempt 1: result refused (expired)"
                in first.output() and first.output(), what="the fenced report")
    assert f"job {job['id']} attempt 1: no heartbeat was acknowledged" in said
    assert f"job {job['id']} attempt 1 ended: failed (stopped by its worker: " in said


class BlackHoleProxy:
    """A TCP proxy on loopback to one upstream address that can black-hole
    traffic: while cut, it forwards nothing either way and connects nothing
    new (the bytes wait, as a partition's retransmissions do); once healed,
    everything flows again.  It keeps what clients sent, to read later."""

    def __init__(self, upstream_port):
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self.sent = bytearray()
        self.lock = threading.Lock()
        self.sockets = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def cut(self):
        self.open.clear()

    def heal(self):
        self.open.set()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client):
        self.open.wait()
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        self.sockets += [client, upstream]
        for source, sink, record in ((client, upstream, True), (upstream, client, False)):
            threading.Thread(target=self._pump, args=(source, sink, record),
                             daemon=True).start()

    def _pump(self, source, sink, record):
        try:
            while True:
                data = source.recv(65536)
                self.open.wait()
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                if record:
                    with self.lock:
                        self.sent += data
                sink.sendall(data)
        except OSError:
            return

    def close(self):
        self.closed = True
        self.open.set()
        self.listener.close()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def proxy(dispatcher):
    made = BlackHoleProxy(int(dispatcher.url.rsplit(":", 1)[1]))
    yield made
    made.close()


def test_a_cut_off_worker_kills_its_job_and_says_so_when_it_gets_through(
        dispatcher, proxy, start_worker, tmp_path):
    """A worker cut off from the dispatcher (a partition: a proxy that
    black-holes its traffic) kills its job at its fence, before the
    dispatcher re-leases it; a second worker runs attempt 2 without overlap;
    and once the partition heals, the first worker's report of the fenced
    attempt reaches the dispatcher, which refuses it as expired."""
    job, first, second, ledger, pids, pid = run_first_attempt_on(
        dispatcher, start_worker, tmp_path, proxy.url, "cut-off")
    proxy.cut()
    try:
        poll(lambda: not alive(pid), timeout=10, what="the first attempt to be killed")
        assert [a["holder"] for a in get(dispatcher, job["id"])["attempts"]] == ["cut-off"]
        assert "no heartbeat was acknowledged" in first.output()
        poll(lambda: (pids / "2").exists(), timeout=15, what="attempt 2 to start")
        assert get(dispatcher, job["id"])["worker"] == "spare"
    finally:
        proxy.heal()
    done = dispatcher.wait(job["id"], ("succeeded", "failed", "cancelled"))
    assert done["state"] == "succeeded", (done, first.output(), second.output())
    assert [a["holder"] for a in done["attempts"]] == ["cut-off", "spare"]
    assert no_overlap(ledger) == ["start 1", "start 2", "end 2"]
    # Its report got through, saying why the attempt failed.
    poll(lambda: b"stopped by its worker: no heartbeat was acknowledged" in bytes(proxy.sent)
         and b"/v1/leases/results" in bytes(proxy.sent), what="the fenced report")
    poll(lambda: f"job {job['id']} attempt 1: " in first.output()
         and ("result refused (expired)" in first.output()
              or "no longer current (expired" in first.output()),
         what="the first worker to hear its lease expired")
