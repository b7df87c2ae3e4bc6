"""
The Slurm backend's pilot mode against a real Slurm (tests/slurm.py): a
real `twistd -n dispatcher` submits `dispatcher worker` pilots with a real
sbatch, the pilots run as Slurm jobs on this host's one node and call
back over loopback, and the tests kill them with a real scancel and
restart the dispatcher with real signals.

Leases last 3 s and squeue runs every second here, so a lost pilot's job
comes back within seconds; every wait polls a condition under a deadline.
"""

import os
import signal
import time
import urllib.request

import pytest

from .conftest import poll as poll_for, free_port
from .slurm import slurm_cluster  # noqa: F401 (a fixture)
from .test_twistd import BIN, Twistd

LEASE_SECONDS = 3


def poll(condition, timeout=60.0, what="the condition"):
    """As conftest's, a minute by default: Slurm's jobs start slowly."""
    return poll_for(condition, timeout, what)



def pilot_dispatcher(tmp_path, cluster, worker_command=None):
    """A started twistd dispatcher that runs the default queue's jobs
    itself and the queue hpc's on pilots of the backend slurm (at most 2,
    one slot each)."""
    port = free_port()
    worker_ini = tmp_path / "worker.ini"
    # The pilots run as root (the submitting user): their jobs too, so
    # that they write where the test looks.
    worker_ini.write_text("[executor]\nrun_as = root\n")
    if worker_command is None:
        worker_command = f"{os.path.join(BIN, 'dispatcher')} worker --config {worker_ini}"
    ini = f"""
[executor]
slots = 2

[workers]
lease_seconds = {LEASE_SECONDS}

[queue:hpc]
backend = slurm

[backend:slurm]
type = slurm
mode = pilot
url = http://127.0.0.1:{port}
partition = debug
time_limit = 600
drain_before = 10
max_pilots = 2
slots = 1
idle_timeout = 5
poll_interval = 1
worker_command = {worker_command}
pilot_dir = {tmp_path}/pilots
sbatch_options = --output={tmp_path}/pilot-%j.out
"""
    daemon = Twistd(str(tmp_path), ini, listen=f"tcp:{port}:interface=127.0.0.1")
    daemon.start()
    return daemon


def end_all(daemon, slurm_cluster):  # noqa: F811
    """Kill every job of the cluster and wait for them to end, then kill
    the dispatcher if it runs."""
    for job_id, state, _ in slurm_cluster.jobs():
        if state in ("PENDING", "RUNNING", "COMPLETING"):
            slurm_cluster.run("scancel", "--signal=KILL", "--full", job_id, check=False)
    poll(lambda: not [j for j in slurm_cluster.jobs() if j[1] in ("RUNNING", "COMPLETING")],
         30, "the pilots to end")
    if daemon.process is not None and daemon.process.poll() is None:
        daemon.kill(signal.SIGKILL)


@pytest.fixture
def pilots(tmp_path, slurm_cluster, monkeypatch):  # noqa: F811
    """A dispatcher with pilots (L{pilot_dispatcher}); killed at teardown,
    after the cluster's jobs are."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.conf)
    daemon = pilot_dispatcher(tmp_path, slurm_cluster)
    yield daemon
    end_all(daemon, slurm_cluster)


def submit(daemon, body):
    code, job = daemon.request("POST", "/v1/jobs", body)
    assert code == 201, job
    return job


def get(daemon, job_id):
    code, job = daemon.request("GET", f"/v1/jobs/{job_id}")
    assert code == 200, job
    return job


def pilot_jobs(cluster):
    return [j for j in cluster.jobs() if j[2].startswith("pilot.slurm.")]


def metrics_text(daemon):
    request = urllib.request.Request(f"{daemon.url}/metrics",
                                     headers={"Authorization": f"Bearer {daemon.token}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.read().decode()


def log_text(daemon):
    with open(os.path.join(daemon.workdir, "out.log")) as f:
        return f.read()


def test_a_backends_queue_runs_on_its_pilots_alone(pilots, slurm_cluster):  # noqa: F811
    """Jobs of the queue on the Slurm backend run on pilots the dispatcher
    submitted with sbatch (never on this host), the default queue's on this
    host (never on a pilot); the pilots show in GET /v1/workers with their
    Slurm job id, at most max_pilots are submitted, and once nothing waits
    the idle pilots are drained and their credentials revoked."""
    hpc = [submit(pilots, {"command": ["sh", "-c", "sleep 0.5; echo $SLURM_JOB_ID"],
                           "queue": "hpc"}) for _ in range(4)]
    local = [submit(pilots, {"command": ["true"]}) for _ in range(3)]
    for job in local:
        done = pilots.wait(job["id"], ("succeeded", "failed"), timeout=30)
        assert done["state"] == "succeeded", done
        assert done["attempts"][-1]["holder"].startswith("local@"), done
    # A pilot shows with its Slurm job id while it runs.
    workers = poll(lambda: pilots.request("GET", "/v1/workers")[1]["workers"],
                   60, "a pilot to connect")
    slurm_ids = {j[0] for j in pilot_jobs(slurm_cluster)}
    for worker in workers:
        assert worker["name"].startswith("pilot.slurm."), worker
        assert worker["labels"]["slurm_job_id"] in slurm_ids, (worker, slurm_ids)
        assert worker["labels"]["backend"] == "slurm"
    for job in hpc:
        done = pilots.wait(job["id"], ("succeeded", "failed"), timeout=90)
        assert done["state"] == "succeeded", done
        assert done["attempts"][-1]["holder"].startswith("pilot.slurm."), done
    assert len(pilot_jobs(slurm_cluster)) <= 2
    metrics = metrics_text(pilots)
    submitted = len(pilot_jobs(slurm_cluster))
    assert f"dispatcher_slurm_pilots_submitted_total {submitted}" in metrics, metrics
    # Nothing waits: the idle pilots are drained, end, and lose their
    # credentials.
    poll(lambda: all(j[1] not in ("PENDING", "RUNNING") for j in pilot_jobs(slurm_cluster)),
         60, "the idle pilots to end")
    poll(lambda: "has ended" in log_text(pilots), 30, "the service to see them end")

    def pilot_credentials():
        code, listing = pilots.request("GET", "/v1/credentials")
        assert code == 200, listing
        return [c["name"] for c in listing["credentials"] if c["name"].startswith("pilot.")]

    poll(lambda: not pilot_credentials(), 30, "the pilots' credentials to be revoked")
    metrics = metrics_text(pilots)
    assert "dispatcher_slurm_pilots 0" in metrics, metrics
    assert f"dispatcher_slurm_pilots_ended_total {submitted}" in metrics, metrics


def test_a_pilot_cancelled_mid_job_loses_the_job_to_another(
        pilots, slurm_cluster, tmp_path):  # noqa: F811
    """A pilot whose Slurm job is cancelled (scancel) while it runs a job:
    the job runs again on another pilot, and its two runs never overlap."""
    trace = tmp_path / "trace"
    script = (f"echo start $(date +%s.%N) >> {trace}; sleep 6; "
              f"echo end $(date +%s.%N) >> {trace}")
    job = submit(pilots, {"command": ["sh", "-c", script], "queue": "hpc",
                          "max_attempts": 3})
    poll(lambda: trace.exists() and "start" in trace.read_text(), 90, "the job to start")
    first = get(pilots, job["id"])
    holder = first["attempts"][-1]["holder"]
    victim = [j for j in pilot_jobs(slurm_cluster) if j[2] == holder]
    assert victim, (holder, slurm_cluster.jobs())
    slurm_cluster.run("scancel", victim[0][0])
    done = pilots.wait(job["id"], ("succeeded", "failed"), timeout=120)
    assert done["state"] == "succeeded", done
    assert len(done["attempts"]) >= 2
    assert done["attempts"][-1]["holder"] != holder
    # Never twice at once: each start follows the previous run's end or
    # its kill; the first run never wrote its end.
    lines = [line.split() for line in trace.read_text().splitlines()]
    starts = [float(t) for what, t in lines if what == "start"]
    ends = [float(t) for what, t in lines if what == "end"]
    assert len(starts) == 2 and len(ends) == 1, lines
    assert ends[0] > starts[1]
    cancelled_at = starts[0]
    assert starts[1] > cancelled_at


def test_a_restarted_dispatcher_finds_its_pilots(pilots, slurm_cluster):  # noqa: F811
    """The dispatcher stopped and started again while its pilots run finds
    them in Slurm (by their comments): it submits no second set, and the
    pilots' jobs and the ones submitted after the restart succeed."""
    jobs = [submit(pilots, {"command": ["sleep", "4"], "queue": "hpc"}) for _ in range(2)]
    poll(lambda: len([j for j in pilot_jobs(slurm_cluster) if j[1] == "RUNNING"]) == 2,
         90, "two pilots to run")
    before = {j[0] for j in pilot_jobs(slurm_cluster)}
    pilots.kill(signal.SIGTERM)
    pilots.start()
    poll(lambda: log_text(pilots).count("of an earlier run found as Slurm job") >= 2,
         30, "the restarted dispatcher to find both pilots")
    later = [submit(pilots, {"command": ["true"], "queue": "hpc"}) for _ in range(2)]
    for job in jobs + later:
        done = pilots.wait(job["id"], ("succeeded", "failed"), timeout=90)
        assert done["state"] == "succeeded", done
        assert done["attempts"][-1]["holder"].startswith("pilot.slurm.")
    after = {j[0] for j in pilot_jobs(slurm_cluster)
             if j[1] in ("PENDING", "RUNNING") or j[0] in before}
    assert after == before, (before, slurm_cluster.jobs())


def test_pilots_that_never_call_hold_further_pilots_back(
        tmp_path, slurm_cluster, monkeypatch):  # noqa: F811
    """Pilots that end without ever calling the dispatcher (here their
    worker command fails at once) are not submitted again and again: each
    such end doubles the wait before the next sbatch, and the log says
    what to look at; the job waits, saying why."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.conf)
    daemon = pilot_dispatcher(tmp_path, slurm_cluster, worker_command="/bin/false")
    try:
        job = submit(daemon, {"command": ["true"], "queue": "hpc"})
        poll(lambda: log_text(daemon).count("without ever calling") >= 2, 60,
             "two pilots to fail")
        time.sleep(4)
        # 2 at first (max_pilots), then one after 2 s, 4 s, 8 s...: in
        # about ten seconds a storm would have made dozens.
        submitted = log_text(daemon).count("submitted as Slurm job")
        assert 2 <= submitted <= 5, log_text(daemon)
        waiting = get(daemon, job["id"])
        assert waiting["state"] == "queued"
        assert "runs on backend slurm" in waiting["wait_reason"], waiting
    finally:
        end_all(daemon, slurm_cluster)


def test_slurmctld_restarted_loses_no_pilot(pilots, slurm_cluster):  # noqa: F811
    """While slurmctld is down, squeue fails and no pilot is taken for lost
    (their credentials stay, their jobs run); once it is back, the
    same pilots run the jobs submitted meanwhile, and no other is
    submitted."""
    first = submit(pilots, {"command": ["true"], "queue": "hpc"})
    assert pilots.wait(first["id"], ("succeeded", "failed"), 90)["state"] == "succeeded"
    before = {j[0] for j in pilot_jobs(slurm_cluster) if j[1] == "RUNNING"}
    assert before
    slurm_cluster.stop_daemon("slurmctld")
    poll(lambda: "squeue failed" in log_text(pilots), 30, "squeue to fail")
    during = [submit(pilots, {"command": ["sleep", "1"], "queue": "hpc"}) for _ in range(3)]
    for job in during:
        done = pilots.wait(job["id"], ("succeeded", "failed"), 60)
        assert done["state"] == "succeeded", done
    assert "has ended" not in log_text(pilots)
    slurm_cluster.start_daemon("slurmctld")
    poll(lambda: "squeue works again" in log_text(pilots), 60, "squeue to work again")
    after = [submit(pilots, {"command": ["true"], "queue": "hpc"}) for _ in range(2)]
    for job in after:
        assert pilots.wait(job["id"], ("succeeded", "failed"), 60)["state"] == "succeeded"
    assert {j[0] for j in pilot_jobs(slurm_cluster)} <= before
    assert log_text(pilots).count("submitted as Slurm job") == len(before)


def test_a_job_that_would_outlast_the_pilots_waits_saying_so(pilots):
    """A job whose timeout is longer than a pilot's time limit (600 s here)
    is never given to it, and waits saying why; a job that fits runs."""
    long = submit(pilots, {"command": ["true"], "queue": "hpc", "timeout": 3600})
    short = submit(pilots, {"command": ["true"], "queue": "hpc", "timeout": 30})
    done = pilots.wait(short["id"], ("succeeded", "failed"), timeout=90)
    assert done["state"] == "succeeded", done
    waiting = poll(lambda: (lambda j: "time limit" in (j["wait_reason"] or "") and j)(
        get(pilots, long["id"])), 30, "the long job's wait reason")
    assert waiting["state"] == "queued"
    assert "before the job's timeout of 3600 s" in waiting["wait_reason"], waiting


def test_a_job_no_pilot_could_fit_calls_for_no_pilot(pilots, slurm_cluster):  # noqa: F811
    """A job asking for more CPUs than a pilot has (1 here) waits saying
    so, and no pilot is submitted for it; a job that fits still gets one."""
    big = submit(pilots, {"command": ["true"], "queue": "hpc", "resources": {"cpus": 8}})
    time.sleep(3)
    assert pilot_jobs(slurm_cluster) == []
    waiting = get(pilots, big["id"])
    assert waiting["state"] == "queued"
    assert waiting["wait_reason"].startswith("no pilot of backend slurm can run it: it asks "
                                             "for 8 CPUs"), waiting
    small = submit(pilots, {"command": ["true"], "queue": "hpc"})
    assert pilots.wait(small["id"], ("succeeded", "failed"), 90)["state"] == "succeeded"
    assert len(pilot_jobs(slurm_cluster)) == 1
    assert get(pilots, big["id"])["state"] == "queued"


def test_sighup_moves_a_queue_off_its_backend(pilots):
    """A reload that takes a queue off its backend applies at once: its
    next jobs run on this host; a change to the backend's own section
    waits for a restart, and says so."""
    with open(pilots.config) as f:
        text = f.read()
    assert "[queue:hpc]\nbackend = slurm\n" in text
    text = text.replace("[queue:hpc]\nbackend = slurm\n", "[queue:hpc]\n")
    text = text.replace("max_pilots = 2", "max_pilots = 3")
    with open(pilots.config, "w") as f:
        f.write(text)
    before = len(log_text(pilots))
    pilots.process.send_signal(signal.SIGHUP)
    poll(lambda: "reloaded" in log_text(pilots)[before:], 20, "the reload")
    said = log_text(pilots)[before:]
    assert "applied [queue:hpc]" in said, said
    poll(lambda: "[backend:slurm] changed, which only a restart applies" in
         log_text(pilots)[before:], 20, "the restart warning")
    job = submit(pilots, {"command": ["true"], "queue": "hpc"})
    done = pilots.wait(job["id"], ("succeeded", "failed"), timeout=30)
    assert done["state"] == "succeeded"
    assert done["attempts"][-1]["holder"].startswith("local@"), done
