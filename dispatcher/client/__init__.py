"""
A Python client of the dispatcher's API: L{Client}, blocking (httpx), for
scripts and notebooks, and L{TwistedClient} (treq, Deferreds) for Twisted
programs, with the same methods.  Answers are decoded into the wire types
the dispatcher encodes them from (L{dispatcher.wire}); refusals are raised
as the L{DispatcherError} of their status, with the error body's code,
message and field.

    >>> from dispatcher.client import Client
    >>> with Client() as dispatcher:
    ...     job = dispatcher.submit(["sh", "-c", "echo hello"], name="greet")
    ...     dispatcher.wait(job.id).state
    <JobState.SUCCEEDED: 'succeeded'>

It speaks to the dispatcher over HTTP alone.  May import:
L{dispatcher.wire} and L{dispatcher.model}; nothing of the server.
"""

from importlib import import_module
from typing import Any

from dispatcher.client._blocking import Client
from dispatcher.client._errors import (
    BadRequest,
    Conflict,
    DispatcherError,
    Forbidden,
    NotFound,
    QuotaExceeded,
    Unauthorized,
    Unavailable,
    Unreachable,
    WaitTimeout,
)
from dispatcher.client._streams import Event
# The wire types a caller builds or reads, from where the server declares
# them.
from dispatcher.model._jobs import JobState
from dispatcher.wire._types import (
    BatchJob,
    EventsReset,
    Identity,
    InputFile,
    JobEvent,
    JobGroup,
    JobSubmission,
    JobSummary,
    JobView,
    QueueView,
    Resources,
    SubmittedJobs,
    WorkerEvent,
    WorkerView,
)

__all__ = [
    # The clients.
    "Client",
    "TwistedClient",
    # What they raise.
    "BadRequest",
    "Conflict",
    "DispatcherError",
    "Forbidden",
    "NotFound",
    "QuotaExceeded",
    "Unauthorized",
    "Unavailable",
    "Unreachable",
    "WaitTimeout",
    # What they take and give.
    "BatchJob",
    "Event",
    "EventsReset",
    "Identity",
    "InputFile",
    "JobEvent",
    "JobGroup",
    "JobState",
    "JobSubmission",
    "JobSummary",
    "JobView",
    "QueueView",
    "Resources",
    "SubmittedJobs",
    "WorkerEvent",
    "WorkerView",
]


def __getattr__(name: str) -> Any:
    # TwistedClient is imported at its first use: treq and Twisted's HTTP
    # client cost the blocking client's users (the dispatcher command, at
    # every call and every completion) about 120 ms to import.
    if name != "TwistedClient":
        raise AttributeError(f"module 'dispatcher.client' has no attribute {name!r}")
    value = import_module("dispatcher.client._twisted").TwistedClient
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
