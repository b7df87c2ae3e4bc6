"""
A worker's prefetch end to end (issue 19): real `dispatcher worker`
processes holding leases beyond their slots, against a real `twistd -n
dispatcher` process, killed with SIGKILL, with a prefetched job cancelled,
and with many short jobs that must never run more than the slots at once.

Leases last 2 s here (the fixtures of tests/test_remote.py), so an expiry
takes seconds; every wait polls a condition under a deadline.
"""

import time

import pytest

from .conftest import poll
from .test_remote import dispatcher, get, read_pid, start_worker, submit  # noqa: F401
from .test_twistd import alive

FINAL = ("succeeded", "failed", "cancelled")


def holding(daemon, name):
    """The ids of the jobs the worker C{name} holds leases on, as
    C{GET /v1/workers} shows them (empty while it is not connected)."""
    code, answer = daemon.request("GET", "/v1/workers")
    assert code == 200, answer
    for worker in answer["workers"]:
        if worker["name"] == name:
            return worker["running"]
    return []


def prefetching_worker(daemon, start_worker, name, slots, prefetch):
    """A worker of C{slots} slots and C{prefetch}, which has run one short
    job: its prefetch is in use from then on."""
    worker = start_worker(daemon.url, name, slots, "--prefetch", str(prefetch))
    warm = submit(daemon, {"command": ["true"]})
    done = daemon.wait(warm["id"], FINAL)
    assert done["state"] == "succeeded", (done, worker.output())
    return worker


def test_a_killed_workers_prefetched_jobs_run_again_elsewhere_never_started_twice(
        dispatcher, start_worker, tmp_path):
    """A worker of one slot and a prefetch of two holds three leases and runs
    one job; killed with SIGKILL, its running job's processes die with it,
    and once the leases run out all three jobs run on another worker; the
    two prefetched ones never started on the first."""
    first = prefetching_worker(dispatcher, start_worker, "p1", 1, 2)
    marks = tmp_path / "marks"
    marks.mkdir()
    command = ["sh", "-c",
               f'echo $$ > {marks}/$DISPATCHER_JOB_ID.$DISPATCHER_ATTEMPT; '
               'if [ "$DISPATCHER_ATTEMPT" = 1 ]; then sleep 60; fi']
    jobs = [submit(dispatcher, {"command": command, "max_attempts": 2})["id"]
            for _ in range(3)]
    poll(lambda: sorted(holding(dispatcher, "p1")) == sorted(jobs),
         what="the first worker to hold all three leases")
    [started] = poll(lambda: sorted(p.name for p in marks.iterdir()) or None,
                     what="a job to start")
    # It has one slot: the two others wait, leased to it, and do not start.
    with pytest.raises(AssertionError):
        poll(lambda: len(list(marks.iterdir())) > 1, timeout=1.0)
    assert all(get(dispatcher, job)["state"] == "running" for job in jobs)
    running = started.split(".")[0]
    pid = read_pid(marks / started)
    first.kill()
    poll(lambda: not alive(pid), timeout=10, what="the orphaned job to be killed")
    second = start_worker(dispatcher.url, "p2", 3, "--prefetch", "0")
    for job in jobs:
        done = dispatcher.wait(job, FINAL, timeout=30)
        assert done["state"] == "succeeded", (done, second.output())
        assert [a["holder"] for a in done["attempts"]] == ["p1", "p2"], done
        assert "its worker p1 sent no heartbeat" in done["attempts"][0]["error"]
        assert (marks / f"{job}.2").exists()
        # Only the job that ran on the first worker started there.
        assert (marks / f"{job}.1").exists() == (job == running)


def test_a_cancelled_prefetched_job_never_starts(dispatcher, start_worker, tmp_path):
    """Cancelling a job its worker holds prefetched (leased, waiting for a
    slot) cancels it without its ever starting: the worker hears at its
    next heartbeat and lets the lease go; the jobs beside it run."""
    worker = prefetching_worker(dispatcher, start_worker, "c1", 1, 2)
    marks, gates = tmp_path / "marks", tmp_path / "gates"
    marks.mkdir()
    gates.mkdir()
    command = ["sh", "-c",
               f"echo $$ > {marks}/$DISPATCHER_JOB_ID; "
               f"while [ ! -e {gates}/$DISPATCHER_JOB_ID ]; do sleep 0.05; done"]
    jobs = [submit(dispatcher, {"command": command})["id"] for _ in range(3)]
    poll(lambda: sorted(holding(dispatcher, "c1")) == sorted(jobs),
         what="the worker to hold all three leases")
    [started] = poll(lambda: sorted(p.name for p in marks.iterdir()) or None,
                     what="a job to start")
    victim = next(job for job in jobs if job != started)
    code, answer = dispatcher.request("POST", f"/v1/jobs/{victim}/cancel")
    assert code == 202, answer
    done = dispatcher.wait(victim, FINAL, timeout=10)
    assert done["state"] == "cancelled", (done, worker.output())
    poll(lambda: victim not in holding(dispatcher, "c1"), what="the lease to be let go")
    assert f"job {victim} attempt 1: the lease is no longer current (cancelled" in (
        worker.output())
    for job in jobs:
        (gates / job).touch()
    for job in jobs:
        if job != victim:
            done = dispatcher.wait(job, FINAL)
            assert done["state"] == "succeeded", (done, worker.output())
    assert not (marks / victim).exists()
    assert get(dispatcher, victim)["state"] == "cancelled"


def test_a_prefetching_worker_never_runs_more_jobs_than_its_slots(
        dispatcher, start_worker, tmp_path):
    """A worker of two slots and a prefetch of four, given forty short
    jobs, holds more leases than its slots while they run, yet never runs
    more than two at once (each job writes when it started and ended), and
    every job runs once."""
    prefetching_worker(dispatcher, start_worker, "s1", 2, 4)
    times = tmp_path / "times"
    times.mkdir()
    command = ["sh", "-c",
               f"echo $(date +%s%N) > {times}/$DISPATCHER_JOB_ID.start; sleep 0.1; "
               f"echo $(date +%s%N) > {times}/$DISPATCHER_JOB_ID.end"]
    jobs = [submit(dispatcher, {"command": command})["id"] for _ in range(40)]
    most = 0
    deadline = time.monotonic() + 60
    while len(list(times.glob("*.end"))) < len(jobs):
        assert time.monotonic() < deadline, "the jobs did not all end"
        most = max(most, len(holding(dispatcher, "s1")))
        time.sleep(0.01)
    for job in jobs:
        done = dispatcher.wait(job, FINAL)
        assert done["state"] == "succeeded", done
        assert len(done["attempts"]) == 1
    # It held leases beyond its slots, within its slots and prefetch.
    assert 2 < most <= 6
    events = []
    for job in jobs:
        events.append((int((times / f"{job}.start").read_text()), 1))
        events.append((int((times / f"{job}.end").read_text()), -1))
    at_once = peak = 0
    for _, change in sorted(events):
        at_once += change
        peak = max(peak, at_once)
    assert peak <= 2
