"""
What the store keeps as JSON, defined here and nowhere else: the one
text a JSON value is stored as (L{encode_stored}) and how it is read back
(L{decode_stored}); a spec's fields that have no column
(L{spec_to_stored}, L{spec_from_stored}) and the texts of L{PlainJobs}
(L{plain_stored}); an attempt's limits and the streams of its log that
were cut (L{limits_to_stored}, L{log_cut_to_stored}); a job's webhook
(L{notify_to_stored}); and the digest of
a request an idempotency key is remembered with (L{request_digest}).

The API's forms are the wire package's; this one is the store's own, so a
change to the API contract cannot change a stored row.  What a database
already holds stays readable: rows written by earlier versions, in the
standard library's form (C{\\u} escapes, C{NaN}), read back the same.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import Any, Mapping, Optional

import orjson

from dispatcher.model._jobs import (
    NO_RESOURCES,
    InputSpec,
    JobSpec,
    JobState,
    Limits,
    Notify,
    PlainJobs,
    Resources,
)

_SORTED = orjson.OPT_SORT_KEYS
_dumps = orjson.dumps
# What orjson cannot write (an integer beyond 64 bits, a lone surrogate,
# a key that is not a string) is written by json, the same way otherwise:
# compact, keys sorted, UTF-8 not escaped.
_json_sorted = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, sort_keys=True
).encode


def encode_stored(value: Any) -> str:
    """
    C{value} as the text the store keeps: compact JSON, keys sorted,
    non-ASCII characters as they are (not escaped).  What JSON cannot
    carry (a NaN, a lone surrogate) never gets here: it is refused where
    it comes in (L{dispatcher.model._values}).
    """
    try:
        return _dumps(value, option=_SORTED).decode("utf-8")
    except TypeError:
        return _json_sorted(value)


# A run of 19 digits or more may be an integer beyond 64 bits, which
# orjson would read as a float.
_LONG_NUMBER = re.compile(r"\d{19}")


def decode_stored(text: str) -> Any:
    """
    The value of a stored JSON text: read by orjson, about four times
    faster than C{json}, unless it may hold an integer orjson cannot keep
    exact, or orjson refuses it (the C{NaN} earlier versions wrote for a
    task's result): then by C{json}.
    """
    if _LONG_NUMBER.search(text) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)


@functools.lru_cache(maxsize=64)
def _limits_text(limits: Limits) -> str:
    return encode_stored(
        {"memory_mb": limits.memory_mb, "processes": limits.processes,
         "enforced": limits.enforced}
    )


def limits_to_stored(limits: Optional[Limits]) -> Optional[str]:
    """
    The text an attempt's L{Limits} are kept as (C{None}: none known).
    Most attempts of a host run under the same few: each text is made once.
    """
    return None if limits is None else _limits_text(limits)


def limits_from_stored(text: Optional[str]) -> Optional[Limits]:
    """
    The L{Limits} of L{limits_to_stored}'s text.
    """
    if text is None:
        return None
    data = decode_stored(text)
    return Limits(data["memory_mb"], data["processes"], data["enforced"])


def log_cut_to_stored(streams: tuple[str, ...]) -> Optional[str]:
    """
    The streams of an attempt's log that were cut, as kept: their names
    joined by commas, C{None} for none.
    """
    return ",".join(streams) if streams else None


def log_cut_from_stored(text: Optional[str]) -> tuple[str, ...]:
    """
    The streams of L{log_cut_to_stored}'s text.
    """
    return tuple(text.split(",")) if text else ()


def notify_to_stored(notify: Notify) -> str:
    """
    The text a job's L{Notify} is kept as in its C{notify} column: its
    states between commas (sorted), a space, and the URL:
    C{",failed,succeeded, https://example.com/hook"}.  Plain text, not
    JSON, so that the store's triggers (L{dispatcher.store._schema}, which
    write the deliveries) read it without SQLite's JSON functions: a state
    is named when C{",STATE,"} is found before the first space, and the URL
    is what follows it (the states hold no space).
    """
    states = ",".join(sorted(state.value for state in notify.events))
    return f",{states}, {notify.url}"


@functools.lru_cache(maxsize=256)
def notify_from_stored(text: str) -> Notify:
    """
    The L{Notify} of L{notify_to_stored}'s text.
    """
    states, _, url = text.partition(" ")
    return Notify(url, frozenset(JobState(s) for s in states.split(",") if s))


def request_digest(path: str, value: Any) -> str:
    """
    The digest an idempotency key is remembered with: the SHA-256 of the
    request's path and its body's JSON value in the stored form, so that
    two bodies with the same JSON value are the same request.
    """
    return hashlib.sha256(encode_stored([path, value]).encode("utf-8")).hexdigest()


def _input_stored(spec: InputSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"url": spec.url, "path": spec.path}
    if spec.sha256 is not None:
        out["sha256"] = spec.sha256
    return out


def spec_to_stored(spec: JobSpec) -> dict[str, Any]:
    """
    The fields of a spec kept as JSON in the C{spec} column (the others
    have columns of their own); empty ones are left out.
    """
    out: dict[str, Any] = {}
    if spec.command is not None:
        out["command"] = list(spec.command)
        if spec.env:
            out["env"] = dict(spec.env)
    else:
        out["task"] = spec.task
        out["args"] = list(spec.args)
        out["kwargs"] = dict(spec.kwargs)
    if spec.inputs:
        out["inputs"] = [_input_stored(i) for i in spec.inputs]
    if spec.depends_on:
        out["depends_on"] = list(spec.depends_on)
    resources = spec.resources
    if resources != NO_RESOURCES:
        out["resources"] = {
            "cpus": resources.cpus, "memory_mb": resources.memory_mb, "gpus": resources.gpus,
        }
    if spec.requirements:
        out["requirements"] = dict(spec.requirements)
    return out


def spec_from_stored(data: Mapping[str, Any], **columns: Any) -> JobSpec:
    """
    Rebuild a spec from its stored JSON's value (L{spec_to_stored}) and
    its columns.
    """
    command = data.get("command")
    resources = data.get("resources")
    return JobSpec(
        command=tuple(command) if command is not None else None,
        task=data.get("task"),
        args=tuple(data.get("args", ())),
        kwargs=dict(data.get("kwargs", {})),
        env=dict(data.get("env", {})),
        inputs=tuple(InputSpec(**i) for i in data.get("inputs", ())),
        depends_on=tuple(data.get("depends_on", ())),
        resources=NO_RESOURCES
        if resources is None
        else Resources(
            float(resources.get("cpus", 0.0)),
            int(resources.get("memory_mb", 0)),
            int(resources.get("gpus", 0)),
        ),
        requirements=dict(data.get("requirements", {})),
        **columns,
    )


def plain_stored(jobs: PlainJobs) -> list[str]:
    """
    The stored texts of L{PlainJobs}' specs, in order: what
    C{encode_stored(spec_to_stored(spec))} gives for each of
    L{PlainJobs.specs}, without making the specs (a thousand of them were
    most of a large batch's time).
    """
    dumps = _dumps
    try:
        return [
            dumps(
                {"command": job} if type(job) is list
                else {"args": job[1], "kwargs": job[2], "task": job[0]},
                option=_SORTED,
            ).decode("utf-8")
            for job in jobs.work
        ]
    except TypeError:
        # An integer beyond 64 bits in a task's arguments, say.
        return [encode_stored(spec_to_stored(spec)) for spec in jobs.specs()]
