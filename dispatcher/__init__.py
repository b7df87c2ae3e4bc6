"""
dispatcher: a networked job dispatcher built on Twisted.

Run it with C{twistd -n dispatcher}; embed it with L{DaemonService}.  Task
functions receive a L{TaskContext}.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Where each public name lives.  They are imported on first use, so that a
# process that needs one layer (a remote worker) does not load them all.
_HOMES = {
    "Attempt": "dispatcher.model._jobs",
    "Config": "dispatcher.config._ini",
    "ConfigError": "dispatcher.config._ini",
    "DaemonService": "dispatcher.app._daemon",
    "IInputStager": "dispatcher.execution._interfaces",
    "IJobStore": "dispatcher.store._interface",
    "IProcessSpawner": "dispatcher.execution._interfaces",
    "IRunningProcess": "dispatcher.execution._interfaces",
    "InputSpec": "dispatcher.model._jobs",
    "InputStager": "dispatcher.execution._staging",
    "InvalidTransition": "dispatcher.model._jobs",
    "Job": "dispatcher.model._jobs",
    "JobEvent": "dispatcher.model._events",
    "JobEvents": "dispatcher.core._events",
    "JobSpec": "dispatcher.model._jobs",
    "JobState": "dispatcher.model._jobs",
    "Lease": "dispatcher.model._jobs",
    "Limits": "dispatcher.model._jobs",
    "Outcome": "dispatcher.model._jobs",
    "ProcessSpawner": "dispatcher.execution._process",
    "SQLiteJobStore": "dispatcher.store._sqlite",
    "Scheduler": "dispatcher.core._scheduler",
    "SpawnError": "dispatcher.execution._process",
    "StagingError": "dispatcher.execution._staging",
    "StaleLease": "dispatcher.model._jobs",
    "TaskContext": "dispatcher.execution._executor",
    "UnknownJob": "dispatcher.model._jobs",
    "load_config": "dispatcher.config._ini",
    "parse_config": "dispatcher.config._ini",
}

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
    "Limits",
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


def __getattr__(name: str) -> Any:
    try:
        home = _HOMES[name]
    except KeyError:
        raise AttributeError(f"module 'dispatcher' has no attribute {name!r}") from None
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
