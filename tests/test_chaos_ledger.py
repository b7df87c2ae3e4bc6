"""
The chaos suite's reading of its ledger (bench/chaos_ledger.py), on made-up
ledgers: the suite itself (bench/chaos.py) runs real daemons under faults
and is not part of this test run, so the counts it prints are checked
here, and its ledger script is run for real under sh and flock.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from bench import chaos_ledger as L

A, B, C = "job-a", "job-b", "job-c"


def ledger(*lines: str) -> list[L.Run]:
    return L.parse_ledger("\n".join(lines) + "\n")


def test_runs_pair_starts_with_ends_by_job_and_pid() -> None:
    """An end line closes the run of the same job and process id; a run
    with no end (killed) stays open, and a torn line is skipped."""
    runs = ledger(
        f"start {A} 1 100 10.0 0",
        f"start {A} 2 200 11.0 0",
        f"end {A} 2 200 12.5",
        f"start {B} 1 300 13.0",  # torn: no held field
        f"end {B} 1 3",
    )
    assert runs == [L.Run(A, 1, 100, 10.0, None, False), L.Run(A, 2, 200, 11.0, 12.5, False)]


def test_overlaps_come_from_the_lock_and_from_the_intervals() -> None:
    """A run that found its job's lock held overlaps, and so does one that
    started inside an earlier run's interval; runs one after the other, or
    of different jobs at once, do not."""
    runs = ledger(
        f"start {A} 1 100 10.0 0",
        f"start {A} 2 101 12.0 1",  # found the lock held
        f"start {B} 1 200 10.0 0",
        f"end {B} 1 200 15.0",
        f"start {B} 2 201 14.0 0",  # inside attempt 1's interval
        f"end {B} 2 201 16.0",
        f"start {C} 1 300 10.0 0",
        f"end {C} 1 300 11.0",
        f"start {C} 2 301 11.5 0",
        f"end {C} 2 301 12.0",
    )
    assert [(r.job, r.attempt) for r in L.overlapping_runs(runs)] == [(A, 2), (B, 2)]


def job(state: str, worker: str = "w0", finished: str | None = None) -> dict:
    return {"state": state, "worker": worker, "finished_at": finished}


def test_tally_counts_each_broken_promise() -> None:
    """Two successful runs are a duplicated success, a failed job with a
    run that exited 0 is a success recorded failed, an acknowledged job
    that is gone, unreadable or not final is lost, a job not final is
    stuck, and a success with no run that ended is a phantom."""
    runs = ledger(
        f"start dup 1 1 1.0 0", "end dup 1 1 2.0",
        f"start dup 2 2 3.0 0", "end dup 2 2 4.0",
        f"start srf 1 3 1.0 0", "end srf 1 3 2.0",
        f"start ok 1 4 1.0 0", "end ok 1 4 2.0",
        f"start killed 1 5 1.0 0",
    )
    jobs = {
        "dup": job("succeeded"), "srf": job("failed"), "ok": job("succeeded"),
        "killed": job("failed"), "gone": L.ABSENT, "broken": L.UNREADABLE,
        "running": job("running"), "phantom": job("succeeded"), "unrun": job("failed"),
        "unacked": job("queued"),
    }
    acked = ["dup", "srf", "ok", "killed", "gone", "broken", "running", "phantom", "unrun"]
    t = L.tally(acked, jobs, runs)
    assert (t.acknowledged, t.lost, t.duplicated, t.overlaps, t.succeeded_recorded_failed,
            t.stuck, t.phantom, t.failed, t.failed_unrun) == (9, 3, 1, 0, 1, 2, 1, 3, 1)
    assert t.examples["lost"] == ["broken", "gone", "running"]
    assert t.examples["stuck"] == ["running", "unacked"]
    assert t.failures() == ["lost", "duplicated", "succeeded_recorded_failed", "stuck",
                            "phantom"]


def test_a_clean_scenario_breaks_nothing() -> None:
    """Every acknowledged job succeeded once, with one run: no count but
    the acknowledged is above zero."""
    runs = ledger("start a 1 1 1.0 0", "end a 1 1 2.0", "start b 1 2 1.5 0", "end b 1 2 3.0")
    t = L.tally(["a", "b"], {"a": job("succeeded"), "b": job("succeeded")}, runs)
    assert t.failures() == []
    assert (t.acknowledged, t.failed) == (2, 0)


def test_recovery_is_timed_to_the_first_finish_on_the_holders_hit() -> None:
    """The first job recorded succeeded that finished after the fault, on
    the holders it hit when given."""
    jobs = [job("succeeded", "w0", "1970-01-01T00:00:12Z"),
            job("succeeded", "w1", "1970-01-01T00:00:11Z"),
            job("failed", "w0", "1970-01-01T00:00:10.5Z"),
            job("succeeded", "w0", "1970-01-01T00:00:09Z")]
    assert L.first_finish_after(jobs, 10.0) == 1.0
    assert L.first_finish_after(jobs, 10.0, frozenset({"w0"})) == 2.0
    assert L.first_finish_after(jobs, 13.0) is None


def test_the_job_script_notes_a_second_run_at_once(tmp_path) -> None:
    """The script every chaos job runs writes its start and end under
    flock, and a second run of the same job started while the first still
    runs says the lock was held."""
    (tmp_path / "locks").mkdir()
    env = {"PATH": os.environ["PATH"], "CHAOS_DIR": str(tmp_path),
           "DISPATCHER_JOB_ID": "j", "DISPATCHER_ATTEMPT": "1"}
    first = subprocess.Popen(["sh", "-c", L.JOB_SCRIPT, "chaos-job", "1"], env=env)
    # The first run holds the lock once its start line is written.
    ledger_path = tmp_path / "ledger"
    deadline = time.monotonic() + 10
    while not (ledger_path.exists() and "start" in ledger_path.read_text()):
        assert time.monotonic() < deadline, "the first run never started"
        time.sleep(0.01)
    second = subprocess.run(["sh", "-c", L.JOB_SCRIPT, "chaos-job", "0"],
                            env={**env, "DISPATCHER_ATTEMPT": "2"})
    assert (first.wait(10), second.returncode) == (0, 0)
    runs = L.parse_ledger(ledger_path.read_text())
    assert [(r.attempt, r.held, r.ended is not None) for r in runs] == [
        (1, False, True), (2, True, True)]
    assert [r.attempt for r in L.overlapping_runs(runs)] == [2]


def test_the_table_shows_what_was_not_measured_as_a_dash() -> None:
    """A row without counts (the daemon refused to start) shows dashes, not
    zeros."""
    text = L.table([{"scenario": "damage-wal", "verdict": "DETECTED", "acknowledged": 12}],
                   markdown=True)
    assert "| damage-wal | DETECTED | 12 | — | — |" in text


def test_the_page_is_the_report_of_its_json() -> None:
    """docs/reliability.md is exactly what bench/chaos.py writes from
    docs/reliability.json with today's method text, so its table is always
    a run's."""
    from bench import chaos

    results = json.loads(chaos.DOCS_JSON.read_text(encoding="utf-8"))
    assert chaos.DOCS.read_text(encoding="utf-8") == chaos.page(results), (
        "docs/reliability.md differs from what bench/chaos.py writes: change the "
        "method in bench/chaos.py, then run `.venv/bin/python -m bench.chaos --report`")
