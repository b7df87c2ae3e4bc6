"""
The Slurm backend's direct mode against a real Slurm (tests/slurm.py): a
real `twistd -n dispatcher` gives each job of the queue hpc a Slurm job of
its own with a real sbatch (an array for jobs submitted together), each
runs `dispatcher worker --one-job` on this host's one node and calls back
over loopback; the tests cancel, scancel, stop slurmctld and restart the
dispatcher with real signals.

Leases last 3 s and squeue runs every second here, so a lost Slurm job's
attempt fails within seconds; every wait polls a condition under a
deadline.
"""

import json
import os
import signal
import time

import pytest

from .conftest import free_port
from .slurm import slurm_cluster  # noqa: F401 (a fixture)
from .test_slurm_pilots import get, log_text, metrics_text, poll, submit
from .test_twistd import BIN, Twistd

LEASE_SECONDS = 3
LIVE = ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING")


def direct_dispatcher(tmp_path, time_limit=600, max_jobs=20, lease_seconds=LEASE_SECONDS):
    """A started twistd dispatcher that runs the default queue's jobs
    itself and gives each job of the queue hpc a Slurm job of its own on
    the backend slurm."""
    port = free_port()
    worker_ini = tmp_path / "worker.ini"
    # The workers run as root (the submitting user): their jobs too, so
    # that they write where the test looks.
    worker_ini.write_text("[executor]\nrun_as = root\n")
    ini = f"""
[executor]
slots = 2

[workers]
lease_seconds = {lease_seconds}

[queue:hpc]
backend = slurm

[backend:slurm]
type = slurm
mode = direct
url = http://127.0.0.1:{port}
partition = debug
time_limit = {time_limit}
max_jobs = {max_jobs}
poll_interval = 1
worker_command = {os.path.join(BIN, 'dispatcher')} worker --config {worker_ini}
pilot_dir = {tmp_path}/nodes
sbatch_options = --output={tmp_path}/slurm-%A_%a.out
"""
    daemon = Twistd(str(tmp_path), ini, listen=f"tcp:{port}:interface=127.0.0.1")
    daemon.start()
    return daemon


def slurm_jobs(cluster):
    """Every direct-mode Slurm job (array tasks one a line): id, state,
    comment."""
    if "slurmctld" not in cluster.processes:
        return []
    out = cluster.run("squeue", "--noheader", "--states=all", "--array",
                      "--name=dispatcher-direct", "--format=%i|%T|%k")
    return [tuple(line.split("|", 2)) for line in out.splitlines() if line.strip()]


def end_all(daemon, cluster):
    for job_id, state, _ in cluster.jobs():
        if state in LIVE:
            cluster.run("scancel", "--signal=KILL", "--full", job_id, check=False)
    poll(lambda: not [j for j in cluster.jobs() if j[1] in ("RUNNING", "COMPLETING")],
         30, "the Slurm jobs to end")
    if daemon.process is not None and daemon.process.poll() is None:
        daemon.kill(signal.SIGKILL)


@pytest.fixture
def direct(tmp_path, slurm_cluster, monkeypatch):  # noqa: F811
    """A dispatcher with a direct-mode backend; killed at teardown, after
    the cluster's jobs are."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.conf)
    daemon = direct_dispatcher(tmp_path)
    yield daemon
    end_all(daemon, slurm_cluster)


def finished(daemon, job_id, timeout=90):
    return daemon.wait(job_id, ("succeeded", "failed", "cancelled"), timeout=timeout)


def direct_credentials(daemon):
    code, listing = daemon.request("GET", "/v1/credentials")
    assert code == 200, listing
    return [c["name"] for c in listing["credentials"] if c["name"].startswith("direct.")]


def test_each_job_runs_in_a_slurm_job_of_its_own(direct, slurm_cluster):  # noqa: F811
    """Jobs of the direct queue each run in a Slurm job of their own (the
    job sees its SLURM_JOB_ID), under a worker named for that job alone,
    with their own exit code; the default queue's jobs run on this host;
    its worker shows in GET /v1/workers with its Slurm job's id; once the
    Slurm jobs end their credentials are revoked."""
    ok = submit(direct, {"command": ["sh", "-c", "sleep 1"], "queue": "hpc"})
    bad = submit(direct, {"command": ["sh", "-c", "exit 3"], "queue": "hpc",
                          "max_attempts": 1})
    local = submit(direct, {"command": ["true"]})
    waiting = get(direct, ok["id"])
    if waiting["state"] == "queued":
        assert "a Slurm job each" in waiting["wait_reason"], waiting
    assert finished(direct, local["id"], 30)["attempts"][-1]["holder"].startswith("local@")
    workers = poll(lambda: direct.request("GET", "/v1/workers")[1]["workers"], 60,
                   "a Slurm job's worker to call")
    assert workers[0]["name"].startswith("direct."), workers
    assert workers[0]["labels"]["backend"] == "slurm"
    assert workers[0]["labels"]["slurm_job_id"] in {j[0] for j in slurm_jobs(slurm_cluster)}
    done = finished(direct, ok["id"])
    assert done["state"] == "succeeded", done
    holder = done["attempts"][-1]["holder"]
    assert holder.startswith(f"direct.{ok['id']}."), done
    failed = finished(direct, bad["id"])
    assert failed["state"] == "failed" and failed["exit_code"] == 3, failed
    assert len(failed["attempts"]) == 1
    slurm_ids = {j[0] for j in slurm_jobs(slurm_cluster)}
    assert len(slurm_ids) == 2, slurm_jobs(slurm_cluster)
    poll(lambda: all(j[1] not in LIVE for j in slurm_jobs(slurm_cluster)), 60,
         "the Slurm jobs to end")
    poll(lambda: not direct_credentials(direct), 30, "the credentials to be revoked")
    metrics = metrics_text(direct)
    assert "dispatcher_slurm_direct_submitted_total 2" in metrics, metrics
    assert "dispatcher_slurm_direct_jobs 0" in metrics, metrics


def test_an_array_is_one_slurm_job_array(direct, slurm_cluster, tmp_path):  # noqa: F811
    """An array of jobs submitted at once is one sbatch: a Slurm job array
    with a task for each job, each task running its own job once; each job
    sees the SLURM_* variables of its own Slurm job (its array task's ids,
    its CPUs), as a Slurm job's own script would."""
    marks = tmp_path / "marks"
    marks.mkdir()
    said = ('x ${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID $SLURM_JOB_ID '
            '$SLURM_CPUS_PER_TASK $SLURM_JOB_NAME')
    array = submit(direct, {"command": ["sh", "-c", f"echo {said} >> {marks}/$DISPATCHER_JOB_ID"],
                            "queue": "hpc", "array": 4, "env": {"SLURM_JOB_NAME": "mine"}})
    ids = [j["id"] for j in array["jobs"]]
    assert len(ids) == 4
    seen = []
    for job_id in ids:
        done = finished(direct, job_id)
        assert done["state"] == "succeeded" and len(done["attempts"]) == 1, done
        x, task, slurm_job_id, cpus, name = (marks / job_id).read_text().split()
        assert x == "x" and slurm_job_id.isdigit() and cpus == "1"
        # The job's own env wins over Slurm's.
        assert name == "mine"
        seen.append(task)
    tasks = slurm_jobs(slurm_cluster)
    assert len({split[0].split("_")[0] for split in tasks}) == 1, tasks
    assert sorted(t[0].split("_")[1] for t in tasks) == ["0", "1", "2", "3"], tasks
    assert sorted(seen) == sorted(t[0] for t in tasks)
    assert log_text(direct).count("submitted as Slurm job") == 1
    assert "(an array of 4)" in log_text(direct)


def test_cancel_reaches_a_job_pending_in_slurm_and_a_running_one(
        direct, slurm_cluster, tmp_path):  # noqa: F811
    """A job whose Slurm job waits in Slurm's queue (the node's CPUs all
    taken) is cancelled through the API and its Slurm job is scancelled;
    a running one is stopped by its worker, whose Slurm job then ends."""
    started = tmp_path / "started"
    big = submit(direct, {"command": ["sh", "-c", f"touch {started}; sleep 120"],
                          "queue": "hpc", "resources": {"cpus": slurm_cluster.cpus}})
    poll(lambda: started.exists(), 90, "the big job to start")
    small = submit(direct, {"command": ["true"], "queue": "hpc"})
    pending = poll(lambda: [j for j in slurm_jobs(slurm_cluster) if j[1] == "PENDING"], 30,
                   "the small job's Slurm job to wait in Slurm")
    code, _ = direct.request("POST", f"/v1/jobs/{small['id']}/cancel")
    assert code == 200
    assert finished(direct, small["id"])["state"] == "cancelled"
    poll(lambda: [j for j in slurm_jobs(slurm_cluster) if j[0] == pending[0][0]
                  and j[1] == "CANCELLED"], 30, "its Slurm job to be cancelled")
    running = [j for j in slurm_jobs(slurm_cluster) if j[1] == "RUNNING"]
    assert len(running) == 1
    code, _ = direct.request("POST", f"/v1/jobs/{big['id']}/cancel")
    # Accepted: its worker stops it.
    assert code == 202
    done = finished(direct, big["id"], 30)
    assert done["state"] == "cancelled", done
    poll(lambda: [j for j in slurm_jobs(slurm_cluster) if j[0] == running[0][0]
                  and j[1] not in LIVE], 30, "the running Slurm job to end")
    assert "is lost" not in log_text(direct)


def test_a_failing_jobs_exit_code_and_signal_are_its_own(direct):
    """A job that exits 7, and one killed by a signal, end failed with that
    exit code and that signal, as the worker saw them, not Slurm's view of
    its batch job (which ends 0)."""
    code7 = submit(direct, {"command": ["sh", "-c", "exit 7"], "queue": "hpc",
                            "max_attempts": 1})
    killed = submit(direct, {"command": ["sh", "-c", "kill -SEGV $$"], "queue": "hpc",
                             "max_attempts": 1})
    done = finished(direct, code7["id"])
    assert done["state"] == "failed" and done["exit_code"] == 7, done
    done = finished(direct, killed["id"])
    assert done["state"] == "failed" and done["exit_code"] == -signal.SIGSEGV, done
    assert len(done["attempts"]) == 1


def test_a_slurm_job_cancelled_mid_job_fails_the_attempt_and_retries(
        direct, slurm_cluster, tmp_path):  # noqa: F811
    """A job whose Slurm job is scancelled while it runs: the attempt fails
    with an error saying so, the job runs again in another Slurm job, and
    its two runs never overlap."""
    trace = tmp_path / "trace"
    script = (f"echo start $(date +%s.%N) >> {trace}; sleep 6; "
              f"echo end $(date +%s.%N) >> {trace}")
    job = submit(direct, {"command": ["sh", "-c", script], "queue": "hpc",
                          "max_attempts": 3})
    poll(lambda: trace.exists() and "start" in trace.read_text(), 90, "the job to start")
    first = [j for j in slurm_jobs(slurm_cluster) if j[1] == "RUNNING"]
    assert len(first) == 1
    slurm_cluster.run("scancel", first[0][0])
    done = finished(direct, job["id"], 120)
    assert done["state"] == "succeeded", done
    assert len(done["attempts"]) == 2, done
    error = done["attempts"][0]["error"]
    assert f"Slurm job {first[0][0]}" in error, done
    lines = [line.split() for line in trace.read_text().splitlines()]
    starts = [float(t) for what, t in lines if what == "start"]
    ends = [float(t) for what, t in lines if what == "end"]
    assert len(starts) == 2 and len(ends) == 1, lines
    assert ends[0] > starts[1] > starts[0]
    ids = {j[0] for j in slurm_jobs(slurm_cluster)}
    assert len(ids) == 2 and first[0][0] in ids


def test_a_job_past_its_slurm_time_limit_fails_saying_so(
        tmp_path, slurm_cluster, monkeypatch):  # noqa: F811
    """A job without a timeout that outlasts the backend's Slurm time limit
    (a minute here) is ended by Slurm, and its attempt fails with an error
    that names the time limit."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.conf)
    daemon = direct_dispatcher(tmp_path, time_limit=60)
    try:
        job = submit(daemon, {"command": ["sleep", "600"], "queue": "hpc", "max_attempts": 1})
        done = finished(daemon, job["id"], 240)
        assert done["state"] == "failed", done
        assert "time limit" in done["error"], done
        assert "0-00:01:00" in done["error"] or "TIMEOUT" in done["error"], done
    finally:
        end_all(daemon, slurm_cluster)


def test_a_restarted_dispatcher_finds_its_slurm_jobs(direct, slurm_cluster):  # noqa: F811
    """The dispatcher stopped and started again while direct jobs run (and
    one waits in Slurm's queue) finds their Slurm jobs by their comments:
    it submits none again, every job succeeds with one attempt, and the
    jobs submitted after the restart get Slurm jobs of their own."""
    jobs = [submit(direct, {"command": ["sleep", "5"], "queue": "hpc"}) for _ in range(3)]
    poll(lambda: len([j for j in slurm_jobs(slurm_cluster) if j[1] == "RUNNING"]) == 2,
         90, "two Slurm jobs to run (the node has two CPUs)")
    before = {j[0] for j in slurm_jobs(slurm_cluster)}
    assert len(before) == 3, slurm_jobs(slurm_cluster)
    direct.kill(signal.SIGTERM)
    direct.start()
    poll(lambda: "of an earlier run found" in log_text(direct), 30,
         "the restarted dispatcher to find its Slurm jobs")
    later = [submit(direct, {"command": ["true"], "queue": "hpc"})]
    for job in jobs + later:
        done = finished(direct, job["id"], 120)
        assert done["state"] == "succeeded", done
        assert len(done["attempts"]) == 1, done
    after = {j[0] for j in slurm_jobs(slurm_cluster)}
    assert before < after and len(after) == 4, (before, slurm_jobs(slurm_cluster))
    assert "is lost" not in log_text(direct)


def test_a_failed_squeue_declares_nothing_lost(direct, slurm_cluster, tmp_path):  # noqa: F811
    """While slurmctld is down, squeue fails and no Slurm job is taken for
    lost; slurmctld restarted while the jobs still run in Slurm finds
    them again (none submitted again), and they finish with one attempt
    each; new jobs get Slurm jobs again."""
    go = tmp_path / "go"
    # The jobs run until the test says so: across slurmctld's restart.
    command = ["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.2; done"]
    jobs = [submit(direct, {"command": command, "queue": "hpc"}) for _ in range(2)]
    poll(lambda: len([j for j in slurm_jobs(slurm_cluster) if j[1] == "RUNNING"]) == 2,
         90, "both to run")
    running = {j[0] for j in slurm_jobs(slurm_cluster)}
    slurm_cluster.stop_daemon("slurmctld")
    poll(lambda: "squeue failed" in log_text(direct), 30, "squeue to fail")
    slurm_cluster.start_daemon("slurmctld")
    poll(lambda: "squeue works again" in log_text(direct), 60, "squeue to work again")
    assert {j[0] for j in slurm_jobs(slurm_cluster) if j[1] == "RUNNING"} == running
    go.touch()
    for job in jobs:
        done = finished(direct, job["id"], 60)
        assert done["state"] == "succeeded" and len(done["attempts"]) == 1, done
    assert "is lost" not in log_text(direct)
    assert "ended before its worker" not in log_text(direct)
    after = submit(direct, {"command": ["true"], "queue": "hpc"})
    assert finished(direct, after["id"])["state"] == "succeeded"
    assert "is lost" not in log_text(direct)


def test_a_batch_written_before_a_crash_that_never_reached_sbatch_is_submitted_once(
        tmp_path, slurm_cluster, monkeypatch):  # noqa: F811
    """The dispatcher killed (SIGKILL) after writing a batch down and
    before its sbatch (here: the batch added to its file while it is
    down): restarted, it finds no Slurm job with the batch's comment, and
    gives the job one Slurm job, which runs it once; the Slurm job that was
    running meanwhile is found, not submitted again."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.conf)
    marks = tmp_path / "marks"
    marks.mkdir()
    # Leases of a minute: the running job's worker must not fence it while
    # the dispatcher is down.
    daemon = direct_dispatcher(tmp_path, max_jobs=1, lease_seconds=60)
    try:
        command = ["sh", "-c", f"sleep 4; echo x >> {marks}/$DISPATCHER_JOB_ID"]
        first = submit(daemon, {"command": command, "queue": "hpc"})
        poll(lambda: [j for j in slurm_jobs(slurm_cluster) if j[1] == "RUNNING"], 90,
             "the first job's Slurm job to run")
        # max_jobs = 1: the second waits unbound.
        second = submit(daemon, {"command": command, "queue": "hpc"})
        time.sleep(1.5)
        assert len(slurm_jobs(slurm_cluster)) == 1
        daemon.kill(signal.SIGKILL)
        path = tmp_path / "data" / "slurm-direct-slurm.json"
        stored = json.loads(path.read_text())
        assert [b["jobs"] for b in stored["batches"]] == [
            [[first["id"], stored["batches"][0]["jobs"][0][1]]]]
        stored["batches"].append({"tag": "0badc0de", "array": False, "slurm_id": None,
                                  "jobs": [[second["id"], f"direct.{second['id']}.0badc0de"]]})
        path.write_text(json.dumps(stored))
        daemon.start()
        for job in (first, second):
            done = finished(daemon, job["id"], 120)
            assert done["state"] == "succeeded", done
            assert len(done["attempts"]) == 1, done
            assert (marks / job["id"]).read_text() == "x\n"
        assert len(slurm_jobs(slurm_cluster)) == 2, slurm_jobs(slurm_cluster)
        assert "of an earlier run found" in log_text(daemon)
        assert "never reached sbatch" in log_text(daemon)
    finally:
        end_all(daemon, slurm_cluster)


def test_a_slurm_job_cancelled_while_pending_spends_an_attempt(
        direct, slurm_cluster):  # noqa: F811
    """A job whose Slurm job is scancelled while it waits in Slurm's queue
    (its worker never started): the job's attempt fails, counted, with an
    error saying Slurm cancelled it, and the job gets another Slurm job,
    which runs it once the node is free."""
    big = submit(direct, {"command": ["sleep", "120"], "queue": "hpc",
                          "resources": {"cpus": slurm_cluster.cpus}})
    poll(lambda: [j for j in slurm_jobs(slurm_cluster) if j[1] == "RUNNING"], 90,
         "the big job's Slurm job to run")
    small = submit(direct, {"command": ["true"], "queue": "hpc", "max_attempts": 2})
    pending = poll(lambda: [j for j in slurm_jobs(slurm_cluster) if j[1] == "PENDING"], 30,
                   "the small job's Slurm job to wait in Slurm")
    slurm_cluster.run("scancel", pending[0][0])
    retried = poll(lambda: (lambda j: j["attempts"] and j["attempts"][0]["error"] and j)(
        get(direct, small["id"])), 30, "the failed attempt to be recorded")
    error = retried["attempts"][0]["error"]
    assert error.startswith(f"its Slurm job {pending[0][0]} was cancelled in Slurm"), retried
    poll(lambda: len([j for j in slurm_jobs(slurm_cluster) if j[1] == "PENDING"]) == 1, 60,
         "another Slurm job for the small job")
    code, _ = direct.request("POST", f"/v1/jobs/{big['id']}/cancel")
    assert code == 202
    done = finished(direct, small["id"], 120)
    assert done["state"] == "succeeded" and len(done["attempts"]) == 2, done
