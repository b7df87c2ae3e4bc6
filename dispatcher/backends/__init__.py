"""
Backends: where the jobs of a queue that names one (C{[queue:NAME] backend
= B}) run, instead of on this host and the plain remote workers.

L{_slurm} runs Slurm's commands (C{sbatch}, C{squeue}, C{scancel},
C{sacct}) as child processes of the reactor, never blocking it; L{_pilots}
keeps a backend's pilots (C{dispatcher worker} as Slurm jobs) submitted,
found and drained; L{_direct} gives each job of a direct-mode backend a
Slurm job of its own (a one-job worker), and finds those that died.

May import: L{dispatcher.model}, L{dispatcher.config}, L{dispatcher.store},
L{dispatcher.core}.
"""

from dispatcher.backends._direct import DirectService
from dispatcher.backends._pilots import Pilot, PilotService
from dispatcher.backends._slurm import SlurmCommands, SlurmError, SlurmJob

__all__ = ["DirectService", "Pilot", "PilotService", "SlurmCommands", "SlurmError", "SlurmJob"]
