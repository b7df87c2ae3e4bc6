"""
Turning a submitted JSON body into a L{JobSpec}, or into an error that
names the field, says what was wrong and what is allowed.
"""

from __future__ import annotations

import datetime
import posixpath
import re
from typing import Any, Mapping, NoReturn, Optional

import attrs
import orjson

from dispatcher.model._jobs import InputSpec, JobSpec, PlainJobs, Resources


class ApiError(Exception):
    """
    A request the API refuses: the HTTP status, a stable code, a message
    for a person and the field at fault (or C{None}).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: Optional[str] = None,
        details: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.details = dict(details or {})

    def to_json(self) -> dict[str, Any]:
        error = {"code": self.code, "message": self.message, "field": self.field}
        error.update(self.details)
        return {"error": error}


def invalid(field: str, message: str) -> NoReturn:
    raise ApiError(400, "invalid_field", f"{field}: {message}", field)


JOB_FIELDS = frozenset(
    {
        "command", "task", "args", "kwargs", "name", "env", "labels", "inputs",
        "priority", "queue", "timeout", "max_attempts", "retry_delay",
        "not_before", "delay", "depends_on", "array", "resources", "requirements",
    }
)
# The fields parse_submission reads; _job_fields reads the others.
SCHEDULING_FIELDS = frozenset(
    {
        "priority", "queue", "timeout", "max_attempts", "retry_delay",
        "not_before", "delay", "depends_on", "array",
    }
)
RESOURCE_FIELDS = ("cpus", "memory_mb", "gpus")
MAX_CPUS = 1_000_000
MAX_MEMORY_MB = 1 << 40
MAX_GPUS = 100_000
MAX_PRIORITY = 1_000_000
MAX_ATTEMPTS = 100
MAX_DEPENDENCIES = 1000
MAX_SECONDS = 366 * 86400.0
INPUT_FIELDS = frozenset({"url", "path", "sha256"})
MAX_NAME = 200
# How deep a task's arguments may nest arrays and objects: what is taken in
# must be written back out in answers (orjson writes 255 levels; json,
# which writes the rest, recurses on the reactor thread's stack).
MAX_NESTING = 100
MAX_LABEL = 200
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_RESERVED_ENV = ("DISPATCHER_",)


def _string(value: Any, field: str, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        invalid(field, f"expected a string, got {_kind(value)}")
    if "\x00" in value:
        invalid(field, "must not contain a NUL character")
    if not allow_empty and not value:
        invalid(field, "must not be empty")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _string_map(value: Any, field: str, max_length: Optional[int] = None) -> dict[str, str]:
    if not isinstance(value, dict):
        invalid(field, f"expected an object of strings, got {_kind(value)}")
    out = {}
    for key, item in value.items():
        _string(key, field, allow_empty=False)
        if max_length is not None and len(key) > max_length:
            invalid(f"{field}.{key}", f"a key may be at most {max_length} characters")
        text = _string(item, f"{field}.{key}")
        if max_length is not None and len(text) > max_length:
            invalid(f"{field}.{key}", f"a value may be at most {max_length} characters")
        out[key] = text
    return out


def check_body(body: Any, allowed: tuple[str, ...], expected: str) -> None:
    """
    Refuse a request body that is not an object (C{expected} says what it
    should be) or has a field not in C{allowed}.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_field", f"body: {expected}", "body")
    for key in body:
        if key not in allowed:
            raise ApiError(
                400,
                "unknown_field",
                f"{key}: unknown field; allowed: {', '.join(allowed)}",
                key,
            )


def check_fields(
    value: Mapping[str, Any],
    field: str,
    allowed: "tuple[str, ...] | frozenset[str]",
    required: tuple[str, ...] = (),
) -> None:
    """
    Refuse an object (at C{field}) with a key not in C{allowed}
    (C{unknown_field}) or without one of C{required} (C{missing_field}).
    """
    for key in value:
        if key not in allowed:
            raise ApiError(
                400,
                "unknown_field",
                f"{field}.{key}: unknown field; allowed: {', '.join(sorted(allowed))}",
                f"{field}.{key}",
            )
    for key in required:
        if key not in value:
            raise ApiError(
                400, "missing_field", f"{field}.{key}: required", f"{field}.{key}"
            )


def _input(value: Any, field: str) -> InputSpec:
    if not isinstance(value, dict):
        invalid(field, f"expected an object with url and path, got {_kind(value)}")
    check_fields(value, field, INPUT_FIELDS, ("url", "path"))
    url = _string(value["url"], f"{field}.url", allow_empty=False)
    if not (url.startswith("http://") or url.startswith("https://")):
        invalid(f"{field}.url", "only http:// and https:// URLs can be fetched")
    path = _string(value["path"], f"{field}.path", allow_empty=False)
    if path.startswith("/"):
        invalid(f"{field}.path", "must be relative to the job's working directory")
    parts = path.split("/")
    if ".." in parts:
        invalid(f"{field}.path", "must not contain '..'")
    normal = posixpath.normpath(path)
    if normal in (".", "") or path.endswith("/"):
        invalid(f"{field}.path", "must name a file")
    sha256 = None
    if value.get("sha256") is not None:
        sha256 = _string(value["sha256"], f"{field}.sha256")
        if not _SHA256.match(sha256):
            invalid(f"{field}.sha256", "expected 64 hexadecimal digits")
        sha256 = sha256.lower()
    return InputSpec(url=url, path=normal, sha256=sha256)


@attrs.frozen
class Submission:
    """
    One validated job of a request: its spec, and how many jobs to make of
    it (C{array}, or C{None} for one plain job).  C{depends_on} entries that
    are integers name earlier jobs of the same batch.
    """

    spec: JobSpec
    array: Optional[int] = None
    batch_dependencies: tuple[tuple[int, int], ...] = ()


def _integer(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        invalid(field, f"expected an integer from {low} to {high}, got {_kind(value)}")
    if not low <= value <= high:
        invalid(field, f"expected an integer from {low} to {high}, got {value}")
    return value


def _seconds(value: Any, field: str, low: float, above: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        invalid(field, f"expected a number of seconds, got {_kind(value)}")
    if value != value or value > MAX_SECONDS or value < low or (above and value == low):
        bound = "above" if above else "from"
        invalid(field, f"expected a number of seconds {bound} {low:g} up to {MAX_SECONDS:g}")
    return float(value)


def _parse_time(value: Any, field: str) -> float:
    text = _string(value, field)
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        invalid(field, "expected an RFC 3339 time such as 2026-11-25T13:00:00Z")
    if moment.tzinfo is None:
        invalid(field, "the time needs a zone: end it with Z or an offset such as +01:00")
    try:
        moment.astimezone(datetime.timezone.utc)
    except OverflowError:
        invalid(field, "the time is out of range")
    if not 1970 <= moment.astimezone(datetime.timezone.utc).year <= 9998:
        invalid(field, "the time is out of range (1970 to 9998)")
    return moment.timestamp()


def parse_submission(
    body: Any,
    tasks: Mapping[str, Any],
    queues: Mapping[str, Any],
    now: float,
    max_array: int,
    prefix: str = "",
    batch_index: Optional[int] = None,
) -> Submission:
    """
    Check one submitted job and build its L{Submission}.

    @param body: the decoded JSON value.
    @param tasks: the configured task names.
    @param queues: the configured queues (L{QueueConfig} by name).
    @param now: the time C{delay} counts from.
    @param max_array: the largest C{array} allowed.
    @param prefix: put before field names (for jobs inside a batch).
    @param batch_index: this job's place in a batch, or C{None} outside one
        (where C{depends_on} may not hold integers).
    @raise ApiError: naming the first field at fault.
    """
    fields = _job_fields(body, tasks, prefix)
    if body.keys().isdisjoint(SCHEDULING_FIELDS):
        # The common case, checked at once: a job that says nothing of its
        # scheduling gets its queue's defaults.
        queue = queues["default"]
        return Submission(
            JobSpec(**fields, priority=queue.priority, timeout=queue.timeout)
        )
    queue_name = "default"
    if body.get("queue") is not None:
        queue_name = _string(body["queue"], f"{prefix}queue", allow_empty=False)
        if queue_name not in queues:
            raise ApiError(
                400,
                "unknown_queue",
                f"{prefix}queue: no queue named {queue_name!r}; known: "
                f"{', '.join(sorted(queues))}",
                f"{prefix}queue",
            )
    queue = queues[queue_name]
    fields["queue"] = queue_name
    fields["priority"] = queue.priority
    fields["timeout"] = queue.timeout
    if body.get("priority") is not None:
        fields["priority"] = _integer(
            body["priority"], f"{prefix}priority", -MAX_PRIORITY, MAX_PRIORITY
        )
    if body.get("timeout") is not None:
        fields["timeout"] = _seconds(body["timeout"], f"{prefix}timeout", 0, above=True)
    if body.get("max_attempts") is not None:
        fields["max_attempts"] = _integer(
            body["max_attempts"], f"{prefix}max_attempts", 1, MAX_ATTEMPTS
        )
    if body.get("retry_delay") is not None:
        fields["retry_delay"] = _seconds(body["retry_delay"], f"{prefix}retry_delay", 0)
    if body.get("not_before") is not None and body.get("delay") is not None:
        invalid(f"{prefix}delay", "give not_before or delay, not both")
    if body.get("not_before") is not None:
        fields["not_before"] = _parse_time(body["not_before"], f"{prefix}not_before")
    if body.get("delay") is not None:
        fields["not_before"] = now + _seconds(body["delay"], f"{prefix}delay", 0)
    depends: list[str] = []
    batch_deps: list[tuple[int, int]] = []
    if body.get("depends_on") is not None:
        value = body["depends_on"]
        field = f"{prefix}depends_on"
        if not isinstance(value, list):
            invalid(field, f"expected an array of job ids, got {_kind(value)}")
        if len(value) > MAX_DEPENDENCIES:
            invalid(field, f"at most {MAX_DEPENDENCIES} entries")
        for i, item in enumerate(value):
            if isinstance(item, int) and not isinstance(item, bool):
                if batch_index is None:
                    invalid(
                        f"{field}[{i}]",
                        "an index names an earlier job of the same batch; use a job id here",
                    )
                if not 0 <= item < batch_index:
                    raise ApiError(
                        400,
                        "invalid_field",
                        f"{field}[{i}]: {item} is not an earlier job of this batch "
                        f"(this is job {batch_index}); a job may depend only on earlier "
                        "ones, so no cycle can form",
                        f"{field}[{i}]",
                    )
                batch_deps.append((i, item))
                depends.append("")
            else:
                depends.append(_string(item, f"{field}[{i}]", allow_empty=False))
        fields["depends_on"] = tuple(depends)
    array = None
    if body.get("array") is not None:
        array = _integer(body["array"], f"{prefix}array", 1, max_array)
    return Submission(JobSpec(**fields), array, tuple(batch_deps))


_TASK_FIELDS = frozenset({"task", "args", "kwargs"})


def plain_jobs(items: list[Any], tasks: Mapping[str, Any], queue: Any) -> Optional[PlainJobs]:
    """
    The jobs of a batch as L{PlainJobs}, if every one is plain: a command
    and nothing else, or a configured task with nothing but its C{args} and
    C{kwargs}; else C{None}, and the batch is L{parse_submission}'s, which
    names any field at fault.  Each plain job is checked as
    L{parse_submission} would check it, and kept as the JSON text its
    L{JobSpec.to_stored} gives.

    @param items: the decoded jobs of the batch.
    @param tasks: the configured task names.
    @param queue: the default queue's L{QueueConfig}, whose defaults the
        jobs take.
    """
    stored = []
    dumps = orjson.dumps
    for item in items:
        if type(item) is not dict:
            return None
        command = item.get("command")
        try:
            if command is not None:
                if len(item) != 1 or type(command) is not list or not command[0]:
                    return None
                # join refuses any argument that is not a string.
                if "\x00" in "".join(command):
                    return None
                stored.append(dumps(item).decode())
            elif "task" in item and item.keys() <= _TASK_FIELDS:
                task = item["task"]
                args = item.get("args", [])
                kwargs = item.get("kwargs", {})
                if (
                    type(task) is not str
                    or task not in tasks
                    or type(args) is not list
                    or type(kwargs) is not dict
                    or not all(key.isidentifier() for key in kwargs)
                    or _too_deep(args)
                    or _too_deep(kwargs)
                ):
                    return None
                stored.append(
                    dumps(
                        {"args": args, "kwargs": kwargs, "task": task},
                        option=orjson.OPT_SORT_KEYS,
                    ).decode()
                )
            else:
                return None
        except (TypeError, IndexError):
            # A command of no arguments, or of something not a string; a
            # value orjson cannot write (an integer beyond 64 bits, a lone
            # surrogate) in a task's arguments.
            return None
    return PlainJobs(stored, priority=queue.priority, timeout=queue.timeout)


def _job_fields(body: Any, tasks: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """
    Check what a submitted job runs; return those fields of its L{JobSpec}
    (the scheduling fields are L{parse_submission}'s).

    @param body: the decoded JSON value.
    @param tasks: the configured task names.
    @param prefix: put before field names (for jobs inside a batch).
    @raise ApiError: naming the first field at fault.
    """
    if not isinstance(body, dict):
        invalid(prefix.rstrip(".") or "body", f"expected a JSON object, got {_kind(body)}")
    if not body.keys() <= JOB_FIELDS:
        key = next(key for key in body if key not in JOB_FIELDS)
        raise ApiError(
            400,
            "unknown_field",
            f"{prefix}{key}: unknown field; allowed: {', '.join(sorted(JOB_FIELDS))}",
            f"{prefix}{key}",
        )
    has_command = body.get("command") is not None
    has_task = body.get("task") is not None
    if has_command == has_task:
        raise ApiError(
            400,
            "missing_field" if not has_command else "invalid_field",
            f"{prefix}command: give exactly one of command (an argv list) or task",
            f"{prefix}command",
        )
    spec: dict[str, Any] = {}
    if has_command:
        command = body["command"]
        if not isinstance(command, list) or not command:
            invalid(f"{prefix}command", "expected a non-empty array of strings (argv)")
        if not (command[0] and all(type(arg) is str and "\x00" not in arg for arg in command)):
            # Find the argument at fault, to name it.
            for i, arg in enumerate(command):
                _string(arg, f"{prefix}command[{i}]", allow_empty=(i > 0))
        spec["command"] = tuple(command)
        for key in ("args", "kwargs"):
            if key in body:
                invalid(f"{prefix}{key}", "only task jobs take args and kwargs")
        if "env" in body:
            env = _string_map(body["env"], f"{prefix}env")
            for key in env:
                if not _ENV_NAME.match(key):
                    invalid(f"{prefix}env.{key}", "not a valid environment variable name")
                if key.startswith(_RESERVED_ENV):
                    invalid(f"{prefix}env.{key}", "names starting DISPATCHER_ are reserved")
            spec["env"] = env
    else:
        task = _string(body["task"], f"{prefix}task", allow_empty=False)
        if task not in tasks:
            known = ", ".join(sorted(tasks)) or "none are configured"
            raise ApiError(
                400,
                "unknown_task",
                f"{prefix}task: no task named {task!r}; known: {known}",
                f"{prefix}task",
            )
        spec["task"] = task
        if "env" in body:
            invalid(f"{prefix}env", "only command jobs take env")
        args = body.get("args", [])
        if not isinstance(args, list):
            invalid(f"{prefix}args", f"expected an array, got {_kind(args)}")
        kwargs = body.get("kwargs", {})
        if not isinstance(kwargs, dict):
            invalid(f"{prefix}kwargs", f"expected an object, got {_kind(kwargs)}")
        for key in kwargs:
            if not key.isidentifier():
                invalid(f"{prefix}kwargs.{key}", "not a valid Python argument name")
        for key, value in (("args", args), ("kwargs", kwargs)):
            if _too_deep(value):
                invalid(f"{prefix}{key}", f"arrays and objects nested more than {MAX_NESTING} deep")
        spec["args"] = tuple(args)
        spec["kwargs"] = kwargs
    if body.get("name") is not None:
        name = _string(body["name"], f"{prefix}name")
        if len(name) > MAX_NAME:
            invalid(f"{prefix}name", f"may be at most {MAX_NAME} characters")
        spec["name"] = name
    if "labels" in body:
        spec["labels"] = _string_map(body["labels"], f"{prefix}labels", MAX_LABEL)
    if "inputs" in body:
        inputs = body["inputs"]
        if not isinstance(inputs, list):
            invalid(f"{prefix}inputs", f"expected an array, got {_kind(inputs)}")
        parsed = tuple(_input(item, f"{prefix}inputs[{i}]") for i, item in enumerate(inputs))
        seen: dict[str, int] = {}
        for i, item in enumerate(parsed):
            if item.path in seen:
                invalid(
                    f"{prefix}inputs[{i}].path",
                    f"the same path as inputs[{seen[item.path]}]",
                )
            seen[item.path] = i
        spec["inputs"] = parsed
    if body.get("resources") is not None:
        spec["resources"] = _resources(body["resources"], f"{prefix}resources")
    if "requirements" in body:
        spec["requirements"] = _string_map(
            body["requirements"], f"{prefix}requirements", MAX_LABEL
        )
    return spec


def _too_deep(value: Any) -> bool:
    """
    Whether C{value} (an array or object: the first level) nests arrays and
    objects more than L{MAX_NESTING} deep.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_NESTING:
            return True
        for child in item.values() if type(item) is dict else item:
            if type(child) is list or type(child) is dict:
                stack.append((child, depth + 1))
    return False


def _resources(value: Any, field: str) -> Resources:
    if not isinstance(value, dict):
        invalid(field, f"expected an object with cpus, memory_mb, gpus; got {_kind(value)}")
    check_fields(value, field, RESOURCE_FIELDS)
    cpus = value.get("cpus", 0)
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not (
        0 <= cpus <= MAX_CPUS
    ):
        invalid(f"{field}.cpus", f"expected a number from 0 to {MAX_CPUS}")
    memory = _integer(value.get("memory_mb", 0), f"{field}.memory_mb", 0, MAX_MEMORY_MB)
    gpus = _integer(value.get("gpus", 0), f"{field}.gpus", 0, MAX_GPUS)
    return Resources(float(cpus), memory, gpus)
