"""
dispatcher: a networked job dispatcher built on Twisted.

Run it with C{twistd -n dispatcher}; embed it with L{DaemonService}.  Task
functions receive a L{TaskContext}.
"""

from ._config import Config, ConfigError, load_config, parse_config
from ._daemon import DaemonService
from ._events import JobEvent, JobEvents
from ._execution import TaskContext
from ._interfaces import IInputStager, IJobStore, IProcessSpawner, IRunningProcess
from ._model import (
    Attempt,
    InputSpec,
    InvalidTransition,
    Job,
    JobSpec,
    JobState,
    Lease,
    Outcome,
    StaleLease,
    UnknownJob,
)
from ._process import ProcessSpawner, SpawnError
from ._scheduler import Scheduler
from ._sqlite import SQLiteJobStore
from ._staging import InputStager, StagingError

__all__ = [
    "Attempt",
    "Config",
    "ConfigError",
    "DaemonService",
    "IInputStager",
    "IJobStore",
    "IProcessSpawner",
    "IRunningProcess",
    "InputSpec",
    "InputStager",
    "InvalidTransition",
    "Job",
    "JobEvent",
    "JobEvents",
    "JobSpec",
    "JobState",
    "Lease",
    "Outcome",
    "ProcessSpawner",
    "SQLiteJobStore",
    "Scheduler",
    "SpawnError",
    "StagingError",
    "StaleLease",
    "TaskContext",
    "UnknownJob",
    "load_config",
    "parse_config",
]
