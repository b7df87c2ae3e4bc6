"""
What a reload of the configuration (SIGHUP) may change in a running
daemon, and what differs between two configurations, key by key.

A reload applies what the daemon reads afresh at each use: the log's
level and its job lines' bound, the fixed tokens (C{[api] token_file},
C{[workers] token_file}), the request limits (C{[dispatcher] max_array},
C{max_stored_bytes}), the quotas and the queues (C{[queue:NAME]}: a
queue added, removed, or with a new limit or new defaults for the jobs
submitted from then on).  Anything else (the listen address, the data
directory, slots, threads, tasks, ...) is built into running parts (a
bound port, thread pools, imported tasks) and waits for a restart: the
reload says which.
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs

from dispatcher.config._ini import Config

# The keys a reload applies, as "[section] key"; every quota section too
# (L{applies}).
RELOADABLE = frozenset({
    "[log] level",
    "[log] job_lines",
    "[api] token_file",
    "[workers] token_file",
    "[dispatcher] max_array",
    "[dispatcher] max_stored_bytes",
})

# The sections that are attrs values of Config, by their ini names.
_SECTIONS = (
    "server", "dispatcher", "executor", "fetch", "workers", "api", "retention",
    "webhooks", "events", "log",
)


def applies(key: str) -> bool:
    """
    Whether a reload applies the key C{key} ("[section] key", or a quota
    section's name).
    """
    return key in RELOADABLE or key.startswith(("[quota", "[queue:"))


def changes(old: Config, new: Config) -> list[str]:
    """
    The keys whose values differ between C{old} and C{new}, as "[section]
    key", in the ini file's order; a token file whose token changed counts
    as its C{token_file} key, a queue or a quota section as a whole.
    """
    found: list[str] = []
    for section in _SECTIONS:
        before, after = getattr(old, section), getattr(new, section)
        for field in attrs.fields(type(before)):
            if getattr(before, field.name) == getattr(after, field.name):
                continue
            name = {"token": "token_file", "secret": "secret_file"}.get(field.name, field.name)
            key = f"[{section}] {name}"
            if key not in found:
                found.append(key)
    found += _mapping("queue:", old.queues, new.queues)
    found += _mapping("backend:", old.backends, new.backends)
    if old.quotas.default != new.quotas.default:
        found.append("[quota]")
    found += _mapping("quota:role=", old.quotas.roles, new.quotas.roles)
    found += _mapping("quota:owner=", old.quotas.owners, new.quotas.owners)
    for name in sorted(set(old.tasks) | set(new.tasks)):
        if getattr(old.tasks.get(name), "target", None) != getattr(
            new.tasks.get(name), "target", None
        ):
            found.append(f"[tasks] {name}")
    if old.task_path != new.task_path:
        found.append("[tasks] path")
    for owner in sorted(set(old.run_as_by_owner) | set(new.run_as_by_owner)):
        if old.run_as_by_owner.get(owner) != new.run_as_by_owner.get(owner):
            found.append(f"[run_as] {owner}")
    return found


def _mapping(prefix: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [
        f"[{prefix}{name}]"
        for name in sorted(set(old) | set(new))
        if old.get(name) != new.get(name)
    ]


def applied(old: Config, new: Config) -> Config:
    """
    The configuration a running daemon has once C{new} is reloaded over
    C{old}: C{new}'s values of the keys a reload applies, C{old}'s of the
    rest (so that the next reload tells again what still waits for a
    restart).
    """
    return attrs.evolve(
        old,
        log=attrs.evolve(old.log, level=new.log.level, job_lines=new.log.job_lines),
        api=attrs.evolve(old.api, token_file=new.api.token_file, token=new.api.token),
        workers=attrs.evolve(
            old.workers, token_file=new.workers.token_file, token=new.workers.token
        ),
        dispatcher=attrs.evolve(
            old.dispatcher,
            max_array=new.dispatcher.max_array,
            max_stored_bytes=new.dispatcher.max_stored_bytes,
        ),
        quotas=new.quotas,
        queues=new.queues,
    )
