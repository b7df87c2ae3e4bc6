"""
Which holders take the jobs of which queues.

A queue that names a backend (C{[queue:NAME] backend = B}) gives its jobs
to that backend's pilots alone: never to this host's executor nor to a
plain remote worker.  On a backend in direct mode each job has a Slurm job
of its own, whose worker calls with a credential named C{direct.JOB.TAG}
(L{direct_name}): it takes that job and no other.  A pilot is known by the credential it calls with,
which the backend made for it: its name is C{pilot.B.TAG}
(L{pilot_name}), so that a restarted dispatcher, which reads it from the
credentials file, still knows whose pilot it is before the pilot's next
call.  Every other queue's jobs go to every holder but the pilots.
"""

from __future__ import annotations

from typing import Mapping, Optional

import attrs

from dispatcher.model._jobs import JobSpec, Offer

PILOT_PREFIX = "pilot."
DIRECT_PREFIX = "direct."


def pilot_name(backend: str, tag: str) -> str:
    """
    The name (of its credential and of the worker) of backend C{backend}'s
    pilot C{tag}.
    """
    return f"{PILOT_PREFIX}{backend}.{tag}"


def pilot_backend(name: Optional[str]) -> Optional[str]:
    """
    The backend whose pilot the credential C{name} is, or C{None}.
    """
    if name is None or not name.startswith(PILOT_PREFIX):
        return None
    backend, _, tag = name[len(PILOT_PREFIX):].rpartition(".")
    return backend if backend and tag else None


def direct_name(job_id: str, tag: str) -> str:
    """
    The name (of its credential and of the worker) of the Slurm job C{tag}
    made for the job C{job_id} alone.
    """
    return f"{DIRECT_PREFIX}{job_id}.{tag}"


def direct_job(name: Optional[str]) -> Optional[str]:
    """
    The job whose Slurm job's credential C{name} is, or C{None}.
    """
    if name is None or not name.startswith(DIRECT_PREFIX):
        return None
    job_id, _, tag = name[len(DIRECT_PREFIX):].rpartition(".")
    return job_id if job_id and tag else None


@attrs.frozen
class PilotShape:
    """
    What every pilot of a backend offers, as far as the dispatcher knows
    before it calls: its CPUs and memory (C{None}: its node's, unknown).
    Its labels, tasks and GPUs depend on its node and its worker command:
    a pilot that calls says them.
    """

    backend: str
    cpus: float
    memory_mb: Optional[int] = None

    def refuses(self, spec: JobSpec) -> Optional[str]:
        """
        Why no pilot of the backend could ever run C{spec}, or C{None}.
        """
        need = spec.resources
        if need.cpus > self.cpus + 1e-9:
            return (
                f"it asks for {need.cpus:g} CPUs and a pilot of backend {self.backend} "
                f"has {self.cpus:g} ([backend:{self.backend}] cpus)"
            )
        if self.memory_mb is not None and need.memory_mb > self.memory_mb:
            return (
                f"it asks for {need.memory_mb} MiB of memory and a pilot of backend "
                f"{self.backend} has {self.memory_mb} ([backend:{self.backend}] memory)"
            )
        return None


@attrs.frozen
class Routing:
    """
    The queues that run on a backend, by queue name, and the shape of each
    backend's pilots, by backend name.
    """

    backends: Mapping[str, str] = attrs.field(factory=dict)
    shapes: Mapping[str, PilotShape] = attrs.field(factory=dict)
    # The backends in direct mode (a Slurm job a job), by name.
    direct: frozenset[str] = frozenset()
    reserved: frozenset[str] = attrs.field(init=False)

    @reserved.default
    def _reserved(self) -> frozenset[str]:
        return frozenset(self.backends)

    def queues_of(self, backend: str) -> frozenset[str]:
        """
        The queues whose jobs run on C{backend}.
        """
        return frozenset(q for q, b in self.backends.items() if b == backend)

    def local(self, offer: Offer) -> Offer:
        """
        C{offer} of a holder that is no pilot: every queue but a backend's.
        """
        if not self.reserved:
            return offer
        return attrs.evolve(offer, queues=None, excluded=self.reserved)

    def remote(self, offer: Offer, credential: Optional[str]) -> Offer:
        """
        C{offer} of a remote worker calling with the credential named
        C{credential}: a backend's pilot takes its backend's queues alone,
        a direct-mode Slurm job's worker its one job (and no queue: it
        stands for no holder of any other job).
        """
        job = direct_job(credential)
        if job is not None:
            return attrs.evolve(offer, queues=frozenset(), excluded=frozenset(), job=job)
        backend = pilot_backend(credential)
        if backend is None:
            return self.local(offer)
        return attrs.evolve(offer, queues=self.queues_of(backend), excluded=frozenset())
