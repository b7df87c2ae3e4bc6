"""
Who calls the dispatcher, as values: a principal (a named credential, or a
local account identified by its socket) and its role, and what each role
may do.

The API finds a request's principal (L{dispatcher.api._auth}) and asks
these rules; the store keeps each job's owner (a principal's name).  docs/security.md
says the same in words.
"""

from __future__ import annotations

import enum
import re
from typing import Optional

import attrs


class Role(str, enum.Enum):
    """
    What a principal may do.
    """

    # Everything: every job, the worker protocol, credentials.
    ADMIN = "admin"
    # Submit; see, cancel and retry its own jobs.
    SUBMITTER = "submitter"
    # See every job; change nothing.
    READER = "reader"
    # The worker protocol only, under its own worker names.
    WORKER = "worker"
    # The metrics alone (GET /metrics): a scraper's token, which reads no
    # job.
    METRICS = "metrics"


class Access(str, enum.Enum):
    """
    What a route needs of its caller.
    """

    # Anyone: the health check and the API's document.
    OPEN = "open"
    # Any principal: who am I.
    IDENTIFIED = "identified"
    # Read jobs, queues and workers: a submitter reads its own jobs only.
    READ = "read"
    # Submit, cancel and retry.
    SUBMIT = "submit"
    # The worker protocol.
    WORK = "work"
    # Credentials.
    ADMINISTER = "administer"
    # The metrics (counts, latencies: no job's contents).
    METRICS = "metrics"


# The roles each access allows.
ALLOWED: dict[Access, frozenset[Role]] = {
    Access.OPEN: frozenset(Role),
    Access.IDENTIFIED: frozenset(Role),
    Access.READ: frozenset({Role.ADMIN, Role.READER, Role.SUBMITTER}),
    Access.SUBMIT: frozenset({Role.ADMIN, Role.SUBMITTER}),
    Access.WORK: frozenset({Role.ADMIN, Role.WORKER}),
    Access.ADMINISTER: frozenset({Role.ADMIN}),
    Access.METRICS: frozenset({Role.ADMIN, Role.READER, Role.METRICS}),
}

# A principal's name: what a job's owner and a credential are called.
# Local account names (SO_PEERCRED) fit it too.
MAX_PRINCIPAL_NAME = 64
PRINCIPAL_NAME_PATTERN = "^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}$"
_PRINCIPAL_NAME = re.compile(PRINCIPAL_NAME_PATTERN)
# The most worker names one worker credential may list.
MAX_WORKER_NAMES = 256
PRINCIPAL_NAME_RULE = (
    f"1 to {MAX_PRINCIPAL_NAME} characters: letters, digits, _ . @ -, "
    "not starting with . @ or -"
)


def valid_name(name: str) -> bool:
    """
    Whether C{name} may name a principal.
    """
    return _PRINCIPAL_NAME.fullmatch(name) is not None


@attrs.frozen
class Principal:
    """
    Who a request comes from.

    @ivar name: the credential's (or the local account's) name; the owner
        of the jobs it submits.
    @ivar role: what it may do.
    @ivar worker_names: for a worker, the worker names it may act under;
        C{None} for any name (the shared C{[workers] token_file} token,
        and admins).
    """

    name: str
    role: Role
    worker_names: Optional[frozenset[str]] = None

    def may(self, access: Access) -> bool:
        """
        Whether it may call a route that needs C{access}.
        """
        return self.role in ALLOWED[access]

    @property
    def sees_all(self) -> bool:
        """
        Whether it sees (and, if it may change anything, changes) every
        job, not only those it owns.
        """
        return self.role is not Role.SUBMITTER

    def owns(self, owner: Optional[str]) -> bool:
        """
        Whether it may see a job owned by C{owner}.
        """
        return self.sees_all or owner == self.name

    def may_act_as(self, worker_name: str) -> bool:
        """
        Whether it may use the worker protocol under C{worker_name}.
        """
        return self.worker_names is None or worker_name in self.worker_names
