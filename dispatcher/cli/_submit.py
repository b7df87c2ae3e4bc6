"""
What C{dispatcher submit} sends: a job (or a batch) built from its options
and its argv, or read from a file of JSON.  Nothing here checks what the
server checks: a value the server refuses comes back as its 400, naming the
field.  Only what the command line itself must split (C{k=v},
C{URL=PATH#sha256}, JSON arguments) is refused here, as a usage error.
"""

from __future__ import annotations

import json
import posixpath
import urllib.parse
from typing import Any, Iterable, Optional, Sequence


class SubmissionError(ValueError):
    """
    An option or a file that cannot be turned into a submission; the
    message names the option (or the file and line) and what is allowed.
    """


def key_values(option: str, pairs: Iterable[str]) -> dict[str, str]:
    """
    C{--label k=v} (and C{--env}, C{--require}) given several times, as a
    map.  A later value of a key wins.

    @raise SubmissionError: a pair without C{=} or with an empty key.
    """
    found: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SubmissionError(f"{option} {pair!r}: expected KEY=VALUE")
        found[key] = value
    return found


def input_file(spec: str) -> dict[str, Any]:
    """
    C{--input URL=PATH[#SHA256]}, or C{--input URL[#SHA256]} (the file
    named as the URL's last path segment), as an input of the wire's
    C{inputs}.

    The path follows the last C{=}: a URL whose query string holds one
    (C{https://h/f?a=b}) needs its path said (C{https://h/f?a=b=f.txt}).
    """
    spec, hash_sep, sha256 = spec.partition("#")
    url, sep, path = spec.rpartition("=")
    if not sep:
        url, path = spec, posixpath.basename(urllib.parse.urlsplit(spec).path)
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise SubmissionError(
            f"--input {spec!r}: expected URL=PATH[#SHA256] with an http(s) URL")
    if not path:
        raise SubmissionError(
            f"--input {spec!r}: the URL names no file; say where it goes: URL=PATH")
    found: dict[str, Any] = {"url": url, "path": path}
    if hash_sep:
        found["sha256"] = sha256
    return found


def json_value(option: str, text: str, kind: type) -> Any:
    """
    A JSON option's value (C{--args '[1, 2]'}, C{--kwargs '{"n": 1}'}),
    which must be of C{kind} (C{list} or C{dict}).
    """
    try:
        value = json.loads(text)
    except ValueError as e:
        raise SubmissionError(f"{option}: not JSON ({e})") from None
    if not isinstance(value, kind):
        raise SubmissionError(
            f"{option}: expected a JSON {'array' if kind is list else 'object'}")
    return value


def job_fields(
    *,
    command: Sequence[str] = (),
    task: Optional[str] = None,
    args: Optional[str] = None,
    kwargs: Optional[str] = None,
    name: Optional[str] = None,
    labels: Sequence[str] = (),
    env: Sequence[str] = (),
    queue: Optional[str] = None,
    priority: Optional[int] = None,
    array: Optional[int] = None,
    after: Sequence[str] = (),
    inputs: Sequence[str] = (),
    timeout: Optional[float] = None,
    max_attempts: Optional[int] = None,
    retry_delay: Optional[float] = None,
    delay: Optional[float] = None,
    not_before: Optional[str] = None,
    cpus: Optional[float] = None,
    memory_mb: Optional[int] = None,
    gpus: Optional[int] = None,
    requirements: Sequence[str] = (),
    notify: Optional[str] = None,
    notify_on: Sequence[str] = (),
) -> dict[str, Any]:
    """
    The wire fields the command line gives: only those given, so that a
    job from a file keeps its own where the command line says nothing.
    C{command} and C{task} are left to the caller.
    """
    fields: dict[str, Any] = {}
    if command:
        fields["command"] = list(command)
    if task is not None:
        fields["task"] = task
    if args is not None:
        fields["args"] = json_value("--args", args, list)
    if kwargs is not None:
        fields["kwargs"] = json_value("--kwargs", kwargs, dict)
    for key, value in (
        ("name", name), ("queue", queue), ("priority", priority), ("array", array),
        ("timeout", timeout), ("max_attempts", max_attempts),
        ("retry_delay", retry_delay), ("delay", delay), ("not_before", not_before),
    ):
        if value is not None:
            fields[key] = value
    if labels:
        fields["labels"] = key_values("--label", labels)
    if env:
        fields["env"] = key_values("--env", env)
    if requirements:
        fields["requirements"] = key_values("--require", requirements)
    if after:
        fields["depends_on"] = list(after)
    if inputs:
        fields["inputs"] = [input_file(spec) for spec in inputs]
    resources = {k: v for k, v in (("cpus", cpus), ("memory_mb", memory_mb), ("gpus", gpus))
                 if v is not None}
    if resources:
        fields["resources"] = resources
    if notify is not None:
        fields["notify"] = {"url": notify}
        if notify_on:
            fields["notify"]["events"] = list(notify_on)
    elif notify_on:
        raise SubmissionError("--notify-on: only with --notify URL")
    return fields


def read_jobs(name: str, text: str) -> tuple[list[dict[str, Any]], bool]:
    """
    The jobs of a C{--file}: a JSON object (one job), a JSON batch
    (C{{"jobs": [...]}}) or a JSON array of jobs, or JSON lines (one job
    a line, blank lines skipped).  Returns the jobs and whether they are a
    batch (submitted together, all or nothing) rather than one job.

    @param name: the file's name, for messages.
    """
    try:
        document = json.loads(text)
    except ValueError:
        document = None
        jobs = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                job = json.loads(line)
            except ValueError as e:
                raise SubmissionError(
                    f"--file {name}: line {number} is not JSON ({e.args[0]})") from None
            if not isinstance(job, dict):
                raise SubmissionError(
                    f"--file {name}: line {number}: expected a JSON object (a job)")
            jobs.append(job)
        if not jobs:
            raise SubmissionError(f"--file {name}: holds no job")
        return jobs, True
    if isinstance(document, dict) and "jobs" in document and not (
            "command" in document or "task" in document):
        document = document["jobs"]
    if isinstance(document, dict):
        return [document], False
    if isinstance(document, list) and document and all(isinstance(j, dict) for j in document):
        return document, True
    raise SubmissionError(
        f"--file {name}: expected a job (a JSON object), a batch ({{\"jobs\": [...]}} "
        "or an array of jobs) or JSON lines")


def merge(job: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """
    A job of a file with the command line's fields over it: labels, env
    and requirements merged key by key, inputs and dependencies added,
    every other field replaced.
    """
    merged = dict(job)
    for key, value in fields.items():
        if key in ("labels", "env", "requirements") and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        elif key in ("inputs", "depends_on") and isinstance(merged.get(key), list):
            merged[key] = merged[key] + value
        else:
            merged[key] = value
    return merged
