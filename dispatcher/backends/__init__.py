"""
Backends: where the jobs of a queue that names one (C{[queue:NAME] backend
= B}) run, instead of on this host and the plain remote workers.

L{_slurm} runs Slurm's commands (C{sbatch}, C{squeue}, C{scancel}) as child
processes of the reactor, never blocking it; L{_pilots} keeps a backend's
pilots (C{dispatcher worker} as Slurm jobs) submitted, found and drained.

May import: L{dispatcher.model}, L{dispatcher.config}, L{dispatcher.store},
L{dispatcher.core}.
"""

from dispatcher.backends._pilots import Pilot, PilotService
from dispatcher.backends._slurm import SlurmCommands, SlurmError, SlurmJob

__all__ = ["Pilot", "PilotService", "SlurmCommands", "SlurmError", "SlurmJob"]
