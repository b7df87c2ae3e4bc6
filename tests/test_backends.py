"""
The Slurm backend without Slurm: its configuration (a wrong value is one
line naming the file, the section and the key), the routing of a
backend's queues to its pilots alone (the claim policy, the wait reasons),
and what a pilot is submitted with (its sbatch options and batch script);
in direct mode, its keys, the one job a Slurm job's worker may take, what
a batch of jobs is submitted with and the errors Slurm's ends become.
The backend against a real Slurm: tests/test_slurm_pilots.py and
tests/test_slurm_direct.py.
"""

import subprocess

import attrs
import pytest

from dispatcher.app._daemon import queue_routing
from dispatcher.backends._direct import SlurmShape, slurm_error, split_task
from dispatcher.backends._direct import batch_script as direct_batch_script
from dispatcher.backends._direct import sbatch_options as direct_sbatch_options
from dispatcher.backends._pilots import batch_script, sbatch_options
from dispatcher.backends._slurm import parse_time
from dispatcher.config._backends import SlurmBackend
from dispatcher.config._ini import ConfigError, parse_config
from dispatcher.core._reasons import explainer
from dispatcher.model._claims import choose_jobs
from dispatcher.model._jobs import Job, JobSpec, JobState, Offer
from dispatcher.model._jobs import Resources
from dispatcher.model._routing import (
    PilotShape,
    Routing,
    direct_job,
    direct_name,
    pilot_backend,
    pilot_name,
)

BACKEND = """
[queue:hpc]
backend = cluster

[backend:cluster]
type = slurm
url = https://dispatch.example:8443
"""


def test_a_backend_section_is_read():
    """A slurm backend's keys are read into its values, with defaults for
    the rest, and the queue names it."""
    config = parse_config(BACKEND + """partition = debug
account = physics
qos = short
time_limit = 7200
drain_before = 300
sbatch_options = --constraint=avx2 --gres=gpu:1
max_pilots = 10
slots = 4
memory = 8000
worker_command = /opt/venv/bin/dispatcher worker --config /etc/w.ini
""", "d.ini")
    backend = config.backends["cluster"]
    assert backend == SlurmBackend(
        "cluster", "https://dispatch.example:8443", partition="debug", account="physics",
        qos="short", time_limit=7200.0, drain_before=300.0,
        sbatch_options=("--constraint=avx2", "--gres=gpu:1"), max_pilots=10, slots=4,
        memory_mb=8000,
        worker_command=("/opt/venv/bin/dispatcher", "worker", "--config", "/etc/w.ini"),
    )
    assert backend.pilot_cpus == 4
    assert config.queues["hpc"].backend == "cluster"
    assert config.queues["default"].backend is None


@pytest.mark.parametrize("extra, message", [
    ("max_pilots = -1", "d.ini: [backend:cluster] max_pilots = '-1': expected an integer"),
    ("max_jobs = 10", "d.ini: [backend:cluster] max_jobs = '10': only for mode = direct"),
    ("mode = direct\nmax_pilots = 3", "d.ini: [backend:cluster] max_pilots = '3': only for "
                                      "mode = pilot (in direct mode each Slurm job is sized "
                                      "to its job's resources)"),
    ("mode = direct\nmemory = 4000", "d.ini: [backend:cluster] memory = '4000': only for "
                                     "mode = pilot"),
    ("mode = direct\nmax_jobs = 0", "d.ini: [backend:cluster] max_jobs = '0': expected an "
                                    "integer of at least 1"),
    ("mode = direct\ngpu_option = cuda", "d.ini: [backend:cluster] gpu_option = 'cuda': "
                                         "expected one of gres, gpus"),
    ("mode = other", "d.ini: [backend:cluster] mode = 'other': expected one of pilot, direct"),
    ("partition = a b", "d.ini: [backend:cluster] partition = 'a b': expected a Slurm name"),
    ("time_limit = 10", "d.ini: [backend:cluster] time_limit = '10': expected a number of "
                        "seconds of at least 60"),
    ("drain_before = 4000", "d.ini: [backend:cluster] drain_before = '4000': expected fewer "
                            "seconds than time_limit (3600)"),
    ("sbatch_options = x --y", "d.ini: [backend:cluster] sbatch_options = 'x --y': expected "
                               "sbatch options"),
    ("sbatch_options = '--a", "d.ini: [backend:cluster] sbatch_options = \"'--a\": expected "
                              "shell words"),
    ("poll_interval = 0", "d.ini: [backend:cluster] poll_interval = '0': expected a number "
                          "of seconds of at least 1"),
    ("colour = red", "d.ini: [backend:cluster] colour = 'red': unknown key; known: type,"),
])
def test_a_wrong_backend_value_is_one_line_naming_file_section_key(extra, message):
    """Each wrong value stops the start with one line that names the file,
    the section, the key and what is allowed."""
    with pytest.raises(ConfigError) as e:
        parse_config(BACKEND + extra + "\n", "d.ini")
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("[queue:hpc]\nbackend = nowhere\n",
     "d.ini: [queue:hpc] backend = 'nowhere': no [backend:nowhere] section names it; "
     "known: none"),
    ("[backend:cluster]\nurl = http://h:1\n",
     "d.ini: [backend:cluster] type: missing; expected the backend's type: slurm"),
    ("[backend:cluster]\ntype = slurm\n",
     "d.ini: [backend:cluster] url: missing; expected the dispatcher's URL"),
    ("[backend:cluster]\ntype = slurm\nurl = ftp://h\n",
     "d.ini: [backend:cluster] url = 'ftp://h': expected the dispatcher's http://"),
    ("[backend:-x]\ntype = slurm\n", "d.ini: [backend:-x]: a backend name may hold"),
])
def test_a_missing_or_unknown_backend_is_refused(text, message):
    """A queue naming no configured backend, or a backend without its type
    or URL, is one line naming what is missing."""
    with pytest.raises(ConfigError) as e:
        parse_config(text, "d.ini")
    assert str(e.value).startswith(message), str(e.value)


def test_pilot_names_carry_their_backend():
    """A pilot's credential name says whose pilot it is; other names say
    nothing."""
    assert pilot_backend(pilot_name("cluster-a", "0f1e")) == "cluster-a"
    assert pilot_backend("pilot.cluster") is None
    assert pilot_backend("alice") is None
    assert pilot_backend(None) is None


def row(name, queue):
    return (0, name, JobSpec(command=("true",), queue=queue))


def choose(offer, queued, capacity=10):
    queues = sorted(queued)
    return choose_jobs(
        {q: iter(rows) for q, rows in queued.items()}, {q: capacity for q in queued},
        queues, 0, offer, offer.resources, capacity, lambda r: r[0], lambda r: r[2],
    )


def test_a_backends_queue_goes_to_its_pilots_alone():
    """The local executor and a plain worker take every queue but the
    backend's; the backend's pilot takes the backend's alone; a holder
    that a queue's jobs wait in is told they were passed over (so the
    scheduler rests it), having read one of them only."""
    routing = Routing({"hpc": "cluster"})
    queued = {"default": [row("d1", "default")],
              "hpc": [row(f"h{i}", "hpc") for i in range(50)]}
    local = routing.local(Offer("local@h", 10))
    choice = choose(local, {q: list(r) for q, r in queued.items()})
    assert [r[1] for r, _ in choice.chosen] == ["d1"]
    assert choice.skipped == 1 and not choice.drained
    worker = routing.remote(Offer("w1", 10), "alice")
    assert [r[1] for r, _ in choose(worker, queued).chosen] == ["d1"]
    pilot = routing.remote(Offer(pilot_name("cluster", "ab"), 10), pilot_name("cluster", "ab"))
    choice = choose(pilot, queued)
    assert [r[1] for r, _ in choice.chosen] == [f"h{i}" for i in range(10)]
    other = routing.remote(Offer("p2", 10), pilot_name("elsewhere", "ab"))
    assert choose(other, queued).chosen == []
    # Without backends nothing changes.
    plain = Routing().local(Offer("local@h", 10))
    assert plain == Offer("local@h", 10)


def test_a_job_of_a_backends_queue_waits_for_a_pilot_saying_so():
    """A queued job of a backend's queue, with no pilot connected, waits
    with a reason naming the backend; a default-queue job does not."""
    routing = Routing({"hpc": "cluster"})
    offers = [routing.local(Offer("local@h", 2))]
    explain = explainer(offers, {"default", "hpc"}, routing.backends)
    hpc = Job("j1", JobState.QUEUED, JobSpec(command=("true",), queue="hpc"), 0.0)
    assert "runs on backend cluster" in explain(hpc).wait_reason
    plain = Job("j2", JobState.QUEUED, JobSpec(command=("true",)), 0.0)
    assert explain(plain) is plain
    pilot = routing.remote(Offer("p", 1), pilot_name("cluster", "x"))
    explain = explainer(offers + [pilot], {"default", "hpc"}, routing.backends)
    assert explain(hpc) is hpc


def test_a_pilot_is_submitted_to_drain_before_its_time_limit():
    """The pilot's sbatch options carry its size, time limit, the drain
    signal to the batch shell, the site's choices, and the backend's own
    options last; its script is valid shell that writes the token to a
    private file and execs the worker."""
    backend = SlurmBackend(
        "cluster", "https://d:8443", partition="debug", account="phys", time_limit=3661,
        drain_before=120, sbatch_options=("--constraint=avx2",), slots=2, memory_mb=4000,
        ca_file="/etc/ca.pem",
    )
    options = sbatch_options(backend, "pilot.cluster.ab")
    assert options[:4] == ["--job-name=dispatcher-pilot", "--comment=pilot.cluster.ab",
                           "--nodes=1", "--ntasks=1"]
    for expected in ("--cpus-per-task=2", "--time=0-01:01:01", "--signal=B:TERM@120",
                     "--mem=4000", "--partition=debug", "--account=phys"):
        assert expected in options
    assert options[-1] == "--constraint=avx2"
    script = batch_script(backend, "pilot.cluster.ab", "dsp_se'cret")
    subprocess.run(["sh", "-n"], input=script.encode(), check=True)
    assert "umask 077" in script
    last = script.strip().splitlines()[-1]
    assert last.startswith("exec dispatcher worker --url https://d:8443 --token-file ")
    for expected in ("--name pilot.cluster.ab", "--slots 2", "--grace 110", "--memory 4000",
                     "--ca-file /etc/ca.pem", "--label backend=cluster"):
        assert expected in last
    assert "dsp_se'\"'\"'cret" in script


def test_a_pilot_takes_no_job_that_would_outlast_it():
    """A holder with little time left refuses a job whose timeout is
    longer, saying so (the claim passes the job over, and its wait reason
    tells why); a job without a timeout, or a shorter one, fits."""
    pilot = Offer("p", 1, time_left=100.0)
    long = JobSpec(command=("true",), timeout=3600)
    assert pilot.refuses(long) == (
        "ends in 100 s (its Slurm time limit), before the job's timeout of 3600 s")
    assert pilot.refuses(JobSpec(command=("true",), timeout=50)) is None
    assert pilot.refuses(JobSpec(command=("true",))) is None
    choice = choose(pilot, {"default": [(0, "long", long)]})
    assert choice.chosen == [] and choice.skipped == 1
    job = Job("j", JobState.QUEUED, long, 0.0)
    explained = explainer([pilot], {"default"}, {"other": "cluster"})(job)
    assert "ends in 100 s" in explained.wait_reason


@pytest.mark.parametrize("text, seconds", [
    ("59", 59.0), ("10:05", 605.0), ("1:00:00", 3600.0), ("2-03:04:05", 183845.0),
    ("UNLIMITED", None), ("NOT_SET", None), ("INVALID", None), ("", None), ("1:x", None),
    ("a-01:00", None),
])
def test_slurm_durations_are_read(text, seconds):
    """squeue's durations read as seconds; the words it writes for none
    read as none."""
    assert parse_time(text) == seconds


def test_a_job_no_pilot_could_fit_waits_saying_so():
    """A job of a backend's queue that asks for more CPUs or memory than
    the backend's pilots are given waits with a reason naming the key to
    change, whether or not pilots are connected; one that fits waits for a
    pilot."""
    routing = Routing({"hpc": "cluster"}, {"cluster": PilotShape("cluster", 2, 4000)})
    explain = explainer([], {"default", "hpc"}, routing.backends, shapes=routing.shapes)

    def waiting(**resources):
        spec = JobSpec(command=("true",), queue="hpc", resources=Resources(**resources))
        return explain(Job("j", JobState.QUEUED, spec, 0.0)).wait_reason

    assert waiting(cpus=4) == (
        "no pilot of backend cluster can run it: it asks for 4 CPUs and a pilot of "
        "backend cluster has 2 ([backend:cluster] cpus); none is submitted for it")
    assert "([backend:cluster] memory)" in waiting(memory_mb=8000)
    assert "runs on backend cluster" in waiting(cpus=2, memory_mb=4000)
    # Memory not given: a pilot has its node's, which is not known.
    assert PilotShape("c", 1).refuses(
        JobSpec(command=("true",), resources=Resources(memory_mb=10 ** 6))) is None


def test_a_direct_backend_section_is_read():
    """mode = direct reads its own keys (max_jobs, gpu_option) beside the
    shared ones, and its backend is routed as direct: its queue's jobs wait
    for a Slurm job of their own, saying so, and no pilot shape applies to
    them."""
    config = parse_config(BACKEND + """mode = direct
partition = debug
time_limit = 600
max_jobs = 50
gpu_option = gpus
poll_interval = 10
""", "d.ini")
    backend = config.backends["cluster"]
    assert backend == SlurmBackend(
        "cluster", "https://dispatch.example:8443", mode="direct", partition="debug",
        time_limit=600.0, max_jobs=50, gpu_option="gpus", poll_interval=10.0,
    )
    routing = queue_routing(config)
    assert routing.direct == frozenset({"cluster"})
    assert routing.shapes == {}
    explain = explainer([], {"default", "hpc"}, routing.backends, shapes=routing.shapes,
                        direct=routing.direct)
    spec = JobSpec(command=("true",), queue="hpc", resources=Resources(cpus=64))
    assert explain(Job("j", JobState.QUEUED, spec, 0.0)).wait_reason == (
        "its queue hpc runs on backend cluster, a Slurm job each: it waits for its own "
        "Slurm job to be submitted and to start")


def test_a_direct_jobs_worker_takes_its_one_job_alone():
    """The worker of a direct-mode Slurm job, known by its credential's
    name, takes no queue at all (its claims read its one job), and names
    of other shapes are no direct worker's."""
    routing = Routing({"hpc": "cluster"}, direct=frozenset({"cluster"}))
    name = direct_name("0190c3e4-aaaa-7bbb-8ccc-dddddddddddd", "ab12cd34")
    assert direct_job(name) == "0190c3e4-aaaa-7bbb-8ccc-dddddddddddd"
    assert len(name) <= 64
    offer = routing.remote(Offer(name, 1), name)
    assert offer.job == "0190c3e4-aaaa-7bbb-8ccc-dddddddddddd"
    assert offer.queues == frozenset() and not offer.takes("hpc")
    assert direct_job("direct.") is None and direct_job("alice") is None
    assert direct_job(None) is None
    # A plain worker still takes every queue but the backend's.
    assert routing.remote(Offer("w", 1), "alice").excluded == frozenset({"hpc"})


def test_a_direct_batch_is_one_sbatch_sized_to_its_jobs():
    """A batch of jobs of one shape is one sbatch: an array of as many tasks
    as jobs, sized to the jobs' CPUs, memory and GPUs, with a time limit of
    their timeout and a minute (the backend's without one), the site's
    choices and the backend's options last; its script is valid shell in
    which each array task runs a one-job worker under its own job's name
    and token, and a task of no job exits."""
    backend = SlurmBackend("cluster", "https://d:8443", mode="direct", partition="debug",
                           sbatch_options=("--constraint=avx2",), time_limit=7200)
    spec = JobSpec(command=("true",), queue="hpc", timeout=100,
                   resources=Resources(cpus=1.5, memory_mb=2000, gpus=1),
                   requirements={"os": "el9"})
    shape = SlurmShape.of(Job("j", JobState.QUEUED, spec, 0.0), backend)
    options = direct_sbatch_options(backend, shape, "t1", 3)
    for expected in ("--job-name=dispatcher-direct", "--comment=direct.cluster.t1",
                     "--cpus-per-task=2", "--time=0-00:02:40", "--array=0-2",
                     "--mem=2000", "--gres=gpu:1", "--partition=debug", "--no-requeue"):
        assert expected in options, (expected, options)
    assert options[-1] == "--constraint=avx2"
    plain = SlurmShape.of(Job("j", JobState.QUEUED, JobSpec(command=("true",)), 0.0), backend)
    one = direct_sbatch_options(attrs.evolve(backend, gpu_option="gpus"), plain, "t2", 1)
    assert "--time=0-02:00:00" in one and "--cpus-per-task=1" in one
    assert not [o for o in one if o.startswith(("--array", "--mem", "--gres", "--gpus"))]
    names = [direct_name(f"job{i}", "t1") for i in range(3)]
    script = direct_batch_script(backend, shape, names, ["dsp_a", "dsp_b", "dsp_c'"])
    subprocess.run(["sh", "-n"], input=script.encode(), check=True)
    last = script.strip().splitlines()[-1]
    for expected in ("--one-job", "--slots 1", "--cpus 1.5", "--memory 2000", "--gpus 1",
                     "--label os=el9", "--label backend=cluster", "--grace 0"):
        assert expected in last, (expected, last)

    def run(task):
        # The script up to its exec, then what it would run.
        body = script.replace("exec dispatcher worker", "echo \"$name $(cat \"$dir/token\")\" #")
        env = {"SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "70", "TMPDIR": tmp,
               "PATH": "/usr/bin:/bin"}
        if task is not None:
            env["SLURM_ARRAY_TASK_ID"] = str(task)
        return subprocess.run(["sh"], input=body.encode(), env=env, capture_output=True)

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        assert run(1).stdout.decode().split() == [names[1], "dsp_b"]
        assert run(2).stdout.decode().split() == [names[2], "dsp_c'"]
        refused = run(7)
        assert refused.returncode == 1 and b"no job for array task 7" in refused.stderr


@pytest.mark.parametrize("state, code, error", [
    ("TIMEOUT", None, "its Slurm job 5_1 reached its Slurm time limit (TIMEOUT), and its "
                      "worker did not report"),
    ("OUT_OF_MEMORY", "0:125", "its Slurm job 5_1 ran out of memory (OUT_OF_MEMORY, exit "
                               "code 0:125), and its worker did not report"),
    ("NODE_FAIL", None, "its Slurm job 5_1 ended in a failure of its node (NODE_FAIL)"),
    ("CANCELLED by 0", None, "its Slurm job 5_1 was cancelled in Slurm"),
    ("PREEMPTED", None, "its Slurm job 5_1 was preempted (PREEMPTED)"),
    ("FAILED", "1:0", "its Slurm job 5_1 ended (FAILED, exit code 1:0) without its worker "
                      "reporting"),
    (None, None, "Slurm job 5_1 ended without reporting"),
])
def test_slurms_end_of_a_direct_job_is_a_clear_error(state, code, error):
    """Slurm's final state of a direct job's Slurm job (squeue's last or
    sacct's) becomes an error that says what Slurm did."""
    assert slurm_error("5_1", state, code).startswith(error)


def test_squeue_ids_of_array_tasks_are_split():
    """An array task's id reads as its array's job id and its index; a
    plain job's, or a pending array's collapsed range, as its job id."""
    assert split_task("123_4") == ("123", 4)
    assert split_task("123") == ("123", None)
    assert split_task("123_[0-3]") == ("123", None)
