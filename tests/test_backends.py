"""
The Slurm backend without Slurm: its configuration (a wrong value is one
line naming the file, the section and the key), the routing of a
backend's queues to its pilots alone (the claim policy, the wait reasons),
and what a pilot is submitted with (its sbatch options and batch script).
The backend against a real Slurm: tests/test_slurm_pilots.py.
"""

import subprocess

import pytest

from dispatcher.backends._pilots import batch_script, sbatch_options
from dispatcher.backends._slurm import parse_time
from dispatcher.config._backends import SlurmBackend
from dispatcher.config._ini import ConfigError, parse_config
from dispatcher.core._reasons import explainer
from dispatcher.model._claims import choose_jobs
from dispatcher.model._jobs import Job, JobSpec, JobState, Offer
from dispatcher.model._jobs import Resources
from dispatcher.model._routing import PilotShape, Routing, pilot_backend, pilot_name

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
    ("mode = direct", "d.ini: [backend:cluster] mode = 'direct': mode = direct (a Slurm "
                      "job a job) is not built yet; use pilot"),
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
