"""
A real Slurm for the tests: Debian's C{slurm-wlm} and C{munge}, started on
this host for one node, without systemd.

Everything is private to a temporary directory: its own munge key and
socket (C{munged --socket}), its own C{slurm.conf} (passed to the daemons
with C{-f} and to the commands through C{SLURM_CONF}), state, spool, logs
and pid files, and free TCP ports for slurmctld and slurmd.  Nothing goes
to C{/etc/slurm} or C{/run/munge}, so a cluster configured on the host is
left alone.  The node is C{select/cons_tres} with a C{debug} partition,
C{SchedulerParameters=batch_sched_delay=0} (the default delay caps short
jobs near 0.7 a second) and C{proctrack/linuxproc} (no cgroups of Slurm's
own: the dispatcher's workers make theirs).

L{slurm_cluster} starts the daemons and waits until the node is idle
(about a second here), and stops them after.  Without root, or without
the packages, a test that needs it skips, saying why; unless
C{DISPATCHER_REQUIRE_SLURM=1} (which C{.ci/run} sets after installing
them): then it fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Iterator, Optional

import attrs
import pytest

COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")

# How long the daemons may take to bring the node up.
START_TIMEOUT = 30.0


def unavailable() -> Optional[str]:
    """
    Why a real Slurm cannot be started here, or C{None}.
    """
    if os.geteuid() != 0:
        return "a real Slurm needs root (slurmd runs jobs as their users)"
    missing = [c for c in COMMANDS if shutil.which(c) is None
               and not os.path.exists(f"/usr/sbin/{c}")]
    if missing:
        return (
            f"Slurm is not installed ({', '.join(missing)} missing): "
            "apt-get install -y slurm-wlm munge"
        )
    return None


def require_slurm() -> None:
    """
    Skip the test (fail it, under C{DISPATCHER_REQUIRE_SLURM=1}) where a
    real Slurm cannot be started.
    """
    why = unavailable()
    if why is None:
        return
    if os.environ.get("DISPATCHER_REQUIRE_SLURM") == "1":
        pytest.fail(f"{why} (DISPATCHER_REQUIRE_SLURM=1: it must be)")
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(command: str) -> str:
    return shutil.which(command) or f"/usr/sbin/{command}"


@attrs.define
class SlurmCluster:
    """
    A running one-node Slurm: its directory, its C{slurm.conf}, and the
    environment its commands need (C{SLURM_CONF}).
    """

    directory: str
    conf: str
    node: str
    cpus: int
    processes: dict[str, subprocess.Popen] = attrs.field(factory=dict)
    munged_pid: Optional[int] = None
    started_in: float = 0.0

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = self.conf
        return env

    def run(self, *args: str, check: bool = True) -> str:
        """
        Run a Slurm command against this cluster; its output.
        """
        done = subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=60
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {done.returncode}: {done.stderr}")
        return done.stdout

    def node_state(self) -> str:
        return self.run("sinfo", "--noheader", "--format=%t", check=False).strip()

    def jobs(self) -> list[tuple[str, str, str]]:
        """
        Every job Slurm shows: id, state, comment.
        """
        if "slurmctld" not in self.processes:
            return []
        out = self.run("squeue", "--noheader", "--states=all", "--format=%i|%T|%k")
        return [tuple(line.split("|", 2)) for line in out.splitlines() if line.strip()]  # type: ignore[misc]

    def log(self, which: str) -> str:
        try:
            with open(os.path.join(self.directory, "log", f"{which}.log")) as f:
                return f.read()
        except OSError:
            return ""

    def start_daemon(self, name: str) -> None:
        """
        Start C{slurmctld} or C{slurmd} (again), in the foreground of a
        process of its own.
        """
        out = open(os.path.join(self.directory, "log", f"{name}.out"), "ab")
        self.processes[name] = subprocess.Popen(
            [_sbin(name), "-D", "-f", self.conf], stdout=out, stderr=subprocess.STDOUT,
            env=self.env, start_new_session=True,
        )
        out.close()

    def stop_daemon(self, name: str) -> None:
        """
        Stop C{slurmctld} or C{slurmd} with SIGTERM, as its service would
        (the jobs run on; a controller saves its state first).
        """
        process = self.processes.pop(name, None)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            self.stop_daemon(name)
        if self.munged_pid is not None:
            try:
                os.kill(self.munged_pid, signal.SIGTERM)
                # It writes its seed file as it exits: wait, so that the
                # directory is removed after.
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and _alive(self.munged_pid):
                    time.sleep(0.05)
            except ProcessLookupError:
                pass
            self.munged_pid = None


def _alive(pid: int) -> bool:
    """
    Whether C{pid} runs (a zombie no longer does).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start_cluster(directory: str) -> SlurmCluster:
    """
    Start munged, slurmctld and slurmd for one node with everything under
    C{directory}, and wait until the node is idle.
    """
    began = time.monotonic()
    for sub in ("state", "spool", "log"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    os.chmod(directory, 0o755)
    key = os.path.join(directory, "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    munge_socket = os.path.join(directory, "munge.socket")
    pid_file = os.path.join(directory, "munged.pid")
    subprocess.run(
        [_sbin("munged"), "--force", f"--socket={munge_socket}", f"--key-file={key}",
         f"--pid-file={pid_file}", f"--log-file={directory}/log/munged.log",
         f"--seed-file={directory}/munged.seed"],
        check=True, timeout=30,
    )
    with open(pid_file) as f:
        munged_pid = int(f.read().strip())
    node = socket.gethostname().split(".")[0]
    cpus = max(2, os.cpu_count() or 2)
    conf = os.path.join(directory, "slurm.conf")
    with open(conf, "w") as f:
        f.write(
            f"""ClusterName=dsptest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={directory}/state
SlurmdSpoolDir={directory}/spool
SlurmctldPidFile={directory}/slurmctld.pid
SlurmdPidFile={directory}/slurmd.pid
SlurmctldLogFile={directory}/log/slurmctld.log
SlurmdLogFile={directory}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
ReturnToService=2
MinJobAge=60
KillWait=5
InactiveLimit=0
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        )
    cluster = SlurmCluster(directory, conf, node, cpus, munged_pid=munged_pid)
    for name in ("slurmctld", "slurmd"):
        cluster.start_daemon(name)
    deadline = time.monotonic() + START_TIMEOUT
    while cluster.node_state() != "idle":
        if time.monotonic() > deadline:
            state = cluster.node_state()
            logs = cluster.log("slurmctld")[-2000:] + cluster.log("slurmd")[-2000:]
            cluster.stop()
            raise AssertionError(f"the Slurm node is {state!r}, not idle, after "
                                 f"{START_TIMEOUT:g} s: {logs}")
        time.sleep(0.1)
    cluster.started_in = time.monotonic() - began
    return cluster


@pytest.fixture
def slurm_cluster() -> Iterator[SlurmCluster]:
    """
    A real one-node Slurm for the test, stopped after it.
    """
    require_slurm()
    directory = tempfile.mkdtemp(prefix="dispatcher-slurm-")
    cluster = start_cluster(directory)
    try:
        yield cluster
    finally:
        # Jobs outlive slurmd (their slurmstepd runs on): end them first.
        live = ("PENDING", "RUNNING", "COMPLETING", "SUSPENDED")
        for job_id, state, _ in cluster.jobs():
            if state in live:
                cluster.run("scancel", "--signal=KILL", "--full", job_id, check=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(j[1] in live for j in cluster.jobs()):
            time.sleep(0.2)
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
