"""
Where jobs' directories go: spread by the UUIDv7 id's time and random
digits so that no directory grows past a few thousand entries, and the
directories of the old layout (jobs/<id[:8]>/<id>) moved into the new one
at start-up, so that their logs, a resumed remote lease's log and a job
run again after a crash all find them.
"""

import collections
import shutil

import pytest_twisted

from dispatcher.execution._executor import job_path, move_old_job_dirs
from dispatcher.model._jobs import JobIds

from .conftest import sleep
from .test_leases import TOKEN, lease, make_pure, report, result, worker  # noqa: F401


def test_jobs_spread_so_no_directory_grows_past_a_few_thousand():
    """65.5 s of jobs at 7,000 a second (one directory of the old layout),
    made in batches as a large submission makes them, fill no directory past
    2,100 entries; ten years of jobs make fewer than 80 directories at the
    top (below it, two hex digits make at most 256 in each)."""
    now = [1_800_000_000.0]
    ids = JobIds(lambda: now[0])
    entries = collections.Counter()
    made = 0
    while made < 458_000:
        entries.update(job_path(job_id).rpartition("/")[0] for job_id in ids.new_many(1000))
        made += 1000
        now[0] += 1000 / 7000
    # Every id of the span shares its first eight hex digits but for the
    # ones at a 65.5 s boundary: one old-layout directory of ~458,000.
    assert max(entries.values()) < 2_100
    assert len(entries) >= 256

    top = set()
    seconds = 1_800_000_000.0
    ids = JobIds(lambda: seconds)
    while seconds < 1_800_000_000 + 10 * 365 * 86400:
        top.add(job_path(ids.new()).split("/")[0])
        seconds += 3600
    assert 60 < len(top) < 80


def test_old_job_dirs_are_moved_into_the_new_layout(tmp_path):
    """Each jobs/<8 hex>/<id> directory goes to job_path(id) with what it
    holds, its emptied old directory is removed, a second pass moves
    nothing, and new-layout directories are left alone."""
    jobs = tmp_path / "jobs"
    ids = JobIds(lambda: 1_800_000_000.0)
    old = ids.new_many(3)
    for job_id in old:
        log = jobs / job_id[:8] / job_id / "attempt-1" / "stdout"
        log.parent.mkdir(parents=True)
        log.write_text(f"log of {job_id}\n")
    new = ids.new()
    (jobs / job_path(new)).mkdir(parents=True)
    assert move_old_job_dirs(str(jobs)) == 3
    for job_id in old:
        assert (jobs / job_path(job_id) / "attempt-1" / "stdout").read_text() == (
            f"log of {job_id}\n")
        assert not (jobs / job_id[:8]).exists()
    assert (jobs / job_path(new)).is_dir()
    assert move_old_job_dirs(str(jobs)) == 0
    assert move_old_job_dirs(str(tmp_path / "none")) == 0


def to_old_layout(data_dir, job_id):
    """Put a job's directory where the old layout kept it, as a daemon of
    before the spread left it."""
    jobs = data_dir / "jobs"
    old = jobs / job_id[:8] / job_id
    old.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(jobs / job_path(job_id)), str(old))
    return old


@pytest_twisted.ensureDeferred
async def test_jobs_of_the_old_layout_are_read_after_a_restart(make_daemon, tmp_path):
    """After a restart on a data directory of the old layout, a finished
    job's log is read through the API, and a job that was running when the
    daemon stopped (and so runs again) keeps its first attempt's log beside
    the second's; no old directory is left."""
    data = tmp_path / "data"
    ini = "[dispatcher]\nshutdown_grace = 0\n[executor]\nslots = 1\n"
    daemon = await make_daemon(ini, data_dir=data)
    done = await daemon.submit({"command": ["echo", "done"]})
    await daemon.wait(done["id"])
    flag = tmp_path / "second"
    again = await daemon.submit({
        "command": ["sh", "-c", f"echo run; [ -e {flag} ] || exec sleep 300"]})
    await daemon.wait(again["id"], ("running",))
    log = data / "jobs" / job_path(again["id"]) / "attempt-1" / "stdout"
    for _ in range(500):
        if log.exists() and log.read_text():
            break
        await sleep(0.01)
    # Stopped with no grace: the running job goes back to the queue, and
    # runs again (to its end, this time) after the restart.
    flag.write_text("")
    await daemon.service.stopService()
    for job_id in (done["id"], again["id"]):
        to_old_layout(data, job_id)

    daemon = await make_daemon(ini, data_dir=data)
    response, body = await daemon.request("GET", f"/v1/jobs/{done['id']}/log")
    assert response.code == 200 and body == b"done\n"
    job = await daemon.wait(again["id"])
    assert len(job["attempts"]) == 2
    attempt_one = data / "jobs" / job_path(again["id"]) / "attempt-1" / "stdout"
    assert attempt_one.read_text() == "run\n"
    assert (attempt_one.parent.parent / "attempt-2" / "stdout").read_text() == "run\n"
    assert [p.name for p in (data / "jobs").iterdir() if len(p.name) == 8] == []


@pytest_twisted.ensureDeferred
async def test_a_resumed_remote_lease_writes_on_into_its_moved_log(make_pure, tmp_path):
    """A remote worker's lease that outlives a restart sends the rest of its
    log at the offset it had reached in the file begun under the old layout:
    the chunk is taken, and the job's log reads whole."""
    data = tmp_path / "keep"
    daemon = await make_pure(data_dir=data)
    who = worker("w")
    job = await daemon.submit({"command": ["x"]})
    (granted,) = await lease(daemon, who)
    headers = {"Authorization": [f"Bearer {TOKEN}"],
               "Content-Type": ["application/octet-stream"]}
    path = (f"/v1/leases/log?job_id={granted['job_id']}&token={granted['token']}"
            "&stream=stdout")
    response, body = await daemon.request("POST", path + "&offset=0", raw=b"hello ",
                                          headers=headers)
    assert response.code == 200, body
    await daemon.service.stopService()
    to_old_layout(data, job["id"])

    daemon = await make_pure(data_dir=data)
    response, body = await daemon.request("POST", path + "&offset=6", raw=b"world\n",
                                          headers=headers)
    assert response.code == 200, body
    code, answer = await report(daemon, who, [result(granted)])
    assert code == 200, answer
    response, log = await daemon.request("GET", f"/v1/jobs/{job['id']}/log")
    assert log == b"hello world\n"
