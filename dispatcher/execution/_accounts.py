"""
Which local account a command job runs as.

A dispatcher that runs as root never runs a job as itself by default: each
command job runs as C{[executor] run_as} (C{nobody} when unset, as HTCondor
falls back to it), or, for an owner named in C{[run_as]}, as the account
the map gives that owner (Slurm and HTCondor run each job as its owner).
Root itself only when written out (C{run_as = root}; see
L{dispatcher.config._ini.run_as}).  The spawner helper takes the account's
ids just before it starts the job (L{dispatcher.execution._spawner}).

A dispatcher that does not run as root cannot change whose a process is:
its jobs run as its own user, and a configuration that names another
account is refused at start.  Task jobs run inside the dispatcher's own
process, as its user, whatever this says.
"""

from __future__ import annotations

import os
import pwd
from typing import Callable, Mapping, Optional

import attrs

from dispatcher.config._ini import DEFAULT_RUN_AS, Config, RunAs, run_as


class AccountRefused(Exception):
    """
    The configuration names an account this process cannot run jobs as, or
    names it wrongly; the message is one line saying where and what to do.
    """


@attrs.frozen
class JobAccounts:
    """
    The account each owner's command jobs run as.

    @ivar default: the account of an owner not in C{by_owner}; C{None}:
        the dispatcher's own (no change of account at all).
    @ivar by_owner: owner (a credential's name) to account.
    @ivar note: one line for the start-up log saying what was chosen when
        nothing was configured, or C{None}.
    """

    default: Optional[RunAs] = None
    by_owner: Mapping[str, RunAs] = attrs.field(factory=dict)
    note: Optional[str] = None

    def for_owner(self, owner: Optional[str]) -> Optional[RunAs]:
        """
        The account a job of C{owner} runs as (C{None}: the dispatcher's).
        """
        if owner is not None and self.by_owner:
            found = self.by_owner.get(owner)
            if found is not None:
                return found
        return self.default


# Jobs run as the dispatcher's own account, with no change of ids.
AS_THE_DISPATCHER = JobAccounts()


def job_accounts(
    config: Config,
    euid: Optional[int] = None,
    own_name: Callable[[int], str] = lambda uid: pwd.getpwuid(uid).pw_name,
) -> JobAccounts:
    """
    Who runs command jobs for a process of effective uid C{euid} (this
    one's by default) under C{config}.

    @raise AccountRefused: an account the process cannot switch to (it is
        not root), or C{nobody} is needed and missing.
    """
    euid = os.geteuid() if euid is None else euid
    where = config.path or "the configuration"
    if euid != 0:
        try:
            name = own_name(euid)
        except KeyError:
            name = f"uid {euid}"
        named = [("[executor] run_as", config.executor.run_as)] + [
            (f"[run_as] {owner}", account)
            for owner, account in config.run_as_by_owner.items()
        ]
        for key, account in named:
            if account is not None and account.uid != euid:
                raise AccountRefused(
                    f"{where}: {key} = {str(account)!r}: this process runs as {name}, "
                    f"not root, so its jobs can only run as {name}; remove the "
                    f"setting, or start it as root"
                )
        return AS_THE_DISPATCHER
    default = config.executor.run_as
    note = None
    if default is None:
        try:
            default = run_as(DEFAULT_RUN_AS)
        except ValueError as e:
            raise AccountRefused(
                f"{where}: [executor] run_as is unset, and a dispatcher running as "
                f"root runs command jobs as {DEFAULT_RUN_AS}, but {e}; set "
                f"[executor] run_as = USER[:GROUP] (run_as = root to run them as root)"
            ) from e
        note = (
            f"command jobs run as {default}: this process runs as root and "
            f"[executor] run_as is unset (set it to choose the account; "
            f"run_as = root runs them as root)"
        )
    return JobAccounts(default, dict(config.run_as_by_owner), note)
