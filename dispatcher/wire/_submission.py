"""
Reading a request body into the wire types of L{dispatcher.wire._types},
and a submitted job into a L{JobSpec}; or into an error that names the
field, says what was wrong and what is allowed.

msgspec checks what the types declare while it decodes; the rules here are
the ones a type cannot hold.  Those JSON Schema can express are stated in
the schema too (L{SUBMISSION_RULES}: one of command or task, not both
times; the configured tasks and queues and C{max_array} are filled in when
the document is served).  Three it cannot express are only described, in
the field's description and in the 400 answer of the operations
concerned: C{args} and C{kwargs} nest at most L{MAX_NESTING} deep; no two
inputs of a job go to one path, and none to a directory of another's; a
batch makes at most C{max_array} jobs in all, arrays counted.

A whole-number float (C{3.0}) where an integer is declared is taken as
that integer, as JSON Schema counts it one (L{decode}).
"""

from __future__ import annotations

import datetime
import functools
import json
import posixpath
import re
import types
from typing import Annotated, Any, Callable, Mapping, NoReturn, Optional, TypeVar, Union
from typing import get_args, get_origin, get_type_hints

import attrs
import msgspec
import orjson
from msgspec import UNSET

from dispatcher.model._jobs import InputSpec, JobSpec, Notify, PlainJobs, Resources
from dispatcher.model._values import UnservableValue, storable
from dispatcher.wire._types import (
    MAX_NESTING,
    NO_NUL,
    PATTERN_MESSAGES,
    RESERVED_ENV,
    Batch,
    BatchJob,
    JobSubmission,
    PlainBatch,
    PlainJob,
)

T = TypeVar("T")


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
        """
        The error as the API answers it (the L{Error} wire type).
        """
        error = {"code": self.code, "message": self.message, "field": self.field}
        error.update(self.details)
        return {"error": error}


def invalid(field: str, message: str) -> NoReturn:
    """
    Refuse the value of C{field} (a 400 C{invalid_field}).
    """
    raise ApiError(400, "invalid_field", f"{field}: {message}", field)


# The rules of a submission that msgspec does not check, as JSON Schema:
# merged into the components of the document, and checked by
# _job_fields and parse_submission below.
_A_COMMAND = {"required": ["command"], "properties": {"command": {"type": "array"}}}
_A_TASK = {"required": ["task"], "properties": {"task": {"type": "string"}}}
_COMMAND_JOB = {
    **_A_COMMAND,
    "not": {"anyOf": [_A_TASK, {"required": ["args"]}, {"required": ["kwargs"]}]},
}
_TASK_JOB = {**_A_TASK, "not": {"anyOf": [_A_COMMAND, {"required": ["env"]}]}}
_NOT_BOTH_TIMES = {
    "not": {
        "required": ["not_before", "delay"],
        "properties": {"not_before": {"type": "string"}, "delay": {"type": "number"}},
    }
}
SUBMISSION_RULES: dict[str, dict[str, Any]] = {
    name: {
        "description": "Exactly one of command (with env) or task (with args and "
        "kwargs); not_before or delay, not both.",
        "oneOf": [_COMMAND_JOB, _TASK_JOB],
        **_NOT_BOTH_TIMES,
    }
    for name in ("JobSubmission", "BatchJob")
}
SUBMISSION_RULES["PlainJob"] = {"oneOf": [_COMMAND_JOB, _TASK_JOB]}
# Only a worker credential lists worker names.
SUBMISSION_RULES["CredentialRequest"] = {
    "if": {"properties": {"role": {"not": {"const": "worker"}}}},
    "then": {"properties": {"worker_names": {"type": "null"}}},
}


# Decoding

_decoders: dict[Any, msgspec.json.Decoder] = {}
_AT = re.compile(r"^(?P<text>.*?)(?: - at `(?P<path>[^`]*)`(?: in `(?P<inner>[^`]*)`)?)?$", re.S)
_TOKEN = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+|\.\.\.)\]")
_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "array": "an array",
    "object": "an object",
    "null": "null",
}

# How many integer fields of a body may be sent as whole-number floats (each
# field once for every job of a batch): a body with more is refused as
# msgspec refuses it, so a refused body costs a bounded number of decodes.
MAX_WHOLE_FLOAT_FIXES = 32
_UNREAD = object()
# msgspec's words for a float where an integer (maybe of a union) is declared.
_INT_GOT_FLOAT = re.compile(
    r"^Expected `(?:[^`]*\| )?int(?: \|[^`]*)?`, got `float` - at `(\$[^`]*)`$"
)


def decode(raw: bytes, kind: type[T], prefix: str = "") -> T:
    """
    The request body C{raw} as a value of the wire type C{kind}.  A float
    with no fraction where C{kind} declares an integer is taken as that
    integer (JSON Schema counts C{3.0} an integer); nowhere else is a
    value changed.

    @raise ApiError: C{malformed_json} if it is not JSON, else a 400 that
        names the field at fault.
    """
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as e:
        error = e
    except msgspec.DecodeError as e:
        raise _not_text(raw, prefix) or ApiError(
            400, "malformed_json", _malformed(raw, str(e)), None
        ) from None
    except RecursionError:
        raise _too_deep_body(raw, prefix) from None
    # Only a body the strict decode refused gets here, so what follows
    # costs a well-formed body nothing.
    value: Any = _UNREAD
    try:
        for _ in range(MAX_WHOLE_FLOAT_FIXES):
            path = _whole_float_path(str(error))
            if path is None:
                break
            if value is _UNREAD:
                value = msgspec.json.decode(raw)
            if not _whole_floats_to_ints(value, path):
                break
            try:
                return decoder.decode(msgspec.json.encode(value))
            except msgspec.ValidationError as e:
                error = e
    except RecursionError:
        raise _too_deep_body(raw, prefix) from None
    load = (lambda: _load_any(raw)) if value is _UNREAD else (lambda: value)
    raise refusal(str(error), load, kind, prefix) from None


def _load_any(raw: bytes) -> Any:
    """
    A refused body's value, to find the field at fault: as msgspec reads
    it, or, where it refuses a number out of range, as json does (1e400
    as infinite).
    """
    try:
        return msgspec.json.decode(raw)
    except msgspec.ValidationError:
        return _loose.decode(raw.decode("utf-8"))


def _whole_float_path(message: str) -> Optional[list[Optional[str]]]:
    """
    The path (with every array index as C{None}: the same field of every
    item) of the float msgspec refused where an integer is declared, or
    C{None} if that is not what C{message} says.
    """
    match = _INT_GOT_FLOAT.match(message)
    if match is None or "[...]" in match.group(1):
        return None
    return [None if isinstance(t, int) else t for t in _tokens(match.group(1))]


def _whole_floats_to_ints(value: Any, path: list[Any]) -> bool:
    """
    Replace, in the decoded body C{value}, each whole-number float at
    C{path} (C{None}: any index of an array) by its integer; whether one
    was replaced.  Only a place msgspec said takes an integer is
    touched, so a task's arguments (any JSON) keep their floats.
    """
    found = False
    places = [value]
    for token in path[:-1]:
        if token is None:
            places = [item for place in places if type(place) is list for item in place]
        else:
            places = [place[token] for place in places if type(place) is dict and token in place]
    last = path[-1] if path else None
    for place in places:
        keys = range(len(place)) if last is None and type(place) is list else (
            [last] if type(place) is dict and last in place else [])
        for key in keys:
            item = place[key]
            if type(item) is float and item.is_integer():
                place[key] = int(item)
                found = True
    return found


# A \\u escape of a high surrogate (one not escaped itself).
_HIGH_SURROGATE = re.compile(rb"(?<!\\)(?:\\\\)*\\u[dD][89abAB][0-9a-fA-F]{2}")


def _malformed(raw: bytes, message: str) -> str:
    """
    What is wrong with a body that is not JSON, in true words: msgspec says
    a string holding a lone surrogate escape (C{"\\ud800"}) was truncated.
    """
    if message == "Input data was truncated" and _HIGH_SURROGATE.search(raw):
        try:
            orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            if "surrogate" in e.msg:
                return (
                    f"the body is not valid JSON: {e.msg} (at character {e.pos}): a \\u escape "
                    "of a UTF-16 surrogate (D800-DFFF) must be a high and low pair; "
                    "alone it is not valid UTF-8 text"
                )
    return f"the body is not valid JSON: {message}"


# Reads what msgspec refused, to find the string at fault: lone surrogate
# escapes are kept (as json does), and so are bytes that are not UTF-8
# (decoded with surrogateescape, as U+DC80 to U+DCFF).
_loose = json.JSONDecoder(parse_constant=lambda name: None)


def _not_text(raw: bytes, prefix: str) -> Optional[ApiError]:
    """
    The 400 naming the field of a body that msgspec refused because a
    string in it is not Unicode text: a lone UTF-16 surrogate escape
    (C{"\\ud800"}), or bytes that are not UTF-8; C{None} if the body is
    refused for another reason, which msgspec's words then say.
    """
    text = raw.decode("utf-8", "surrogateescape")
    try:
        value = _loose.decode(text)
    except (ValueError, RecursionError):
        return None
    try:
        storable(value, "")
    except UnservableValue as e:
        fault = e
    except RecursionError:
        return None
    else:
        return None
    # (A key at fault is named by its object.)
    if "surrogate" not in fault.why:
        return None
    try:
        raw.decode("utf-8")
        why = fault.why
    except UnicodeDecodeError:
        # (A lone surrogate escape in a body that also has bytes that are
        # not UTF-8 is called the latter: either is refused.)
        why = ("holds bytes that are not UTF-8" if "key" not in fault.why
               else "a key holds bytes that are not UTF-8")
        why += "; a body is UTF-8 text"
    field = _field(prefix, list(fault.path)) or "body"
    return ApiError(400, "invalid_field", f"{field}: {why}", field)


def _too_deep_body(raw: bytes, prefix: str) -> ApiError:
    """
    The error for a body nested deeper than msgspec follows (which stops
    at the interpreter's recursion limit): orjson, which follows 1,024
    levels without recursing in Python, reads it, and the field whose
    value nests too deep is named (the first C{args}, C{kwargs} or a
    worker's C{result} on the way down).
    """
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ApiError(400, "malformed_json", "the body is nested too deeply", None)
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_NESTING:
            for i, token in enumerate(path):
                if token in ("args", "kwargs", "result"):
                    path = path[: i + 1]
                    break
            field = _field(prefix, path) or "body"
            return ApiError(
                400,
                "invalid_field",
                f"{field}: arrays and objects nested more than {MAX_NESTING} deep",
                field,
            )
        if type(item) is dict:
            stack.extend((child, path + [key]) for key, child in item.items())
        elif type(item) is list:
            stack.extend((child, path + [i]) for i, child in enumerate(item))
    return ApiError(400, "malformed_json", "the body is nested too deeply", None)


def convert(value: Any, kind: type[T], prefix: str = "") -> T:
    """
    An already decoded JSON value as a value of the wire type C{kind}.

    @raise ApiError: a 400 that names the field at fault.
    """
    try:
        return msgspec.convert(value, kind, strict=True)
    except msgspec.ValidationError as e:
        raise refusal(str(e), lambda: value, kind, prefix) from None


def _tokens(path: str) -> list[str | int]:
    out: list[str | int] = []
    for name, index in _TOKEN.findall(path[1:]):
        out.append(name if name else ("..." if index == "..." else int(index)))
    return out


def _field(prefix: str, tokens: list[str | int]) -> str:
    text = prefix.rstrip(".")
    for token in tokens:
        if isinstance(token, int):
            text += f"[{token}]"
        else:
            text = f"{text}.{token}" if text else str(token)
    return text


def _say(text: str) -> str:
    """
    msgspec's words for what was wrong, as this API says it.
    """
    for pattern, message in PATTERN_MESSAGES.items():
        if f"'{pattern}'" in text or repr(pattern) in text:
            return message
    if text == "Number out of range":
        # (1e999: json would read it as infinite, and write it as null.)
        return "number out of range: a number must be finite, within a 64-bit float's range"
    def words(match: "re.Match[str]") -> str:
        return " or ".join(_WORDS.get(part, part) for part in match.group(1).split(" | "))

    text = re.sub(r"`([^`]*)`", words, text)
    return text[:1].lower() + text[1:]


def _unwrap(kind: Any, value: Any = None, want: Optional[type] = None) -> Any:
    """
    C{kind} without C{Annotated} and with the member of a union that fits
    C{value} (or is a C{want}: C{dict} or C{list}).
    """
    while True:
        origin = get_origin(kind)
        if origin is Annotated:
            kind = get_args(kind)[0]
        elif origin is Union or origin is types.UnionType:
            target = want or (dict if isinstance(value, dict) else list if isinstance(value, list) else None)
            for member in get_args(kind):
                inner = _unwrap(member)
                base = get_origin(inner) or inner
                if target is dict and (base is dict or _is_struct(inner)):
                    kind = member
                    break
                if target is list and base is list:
                    kind = member
                    break
            else:
                return kind
        else:
            return kind


def _is_struct(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, msgspec.Struct)


def _step(kind: Any, value: Any, token: str | int) -> tuple[Any, Any]:
    """
    The type and value one step down a path.
    """
    if isinstance(token, int):
        kind = _unwrap(kind, value, list)
        return get_args(kind)[0], value[token] if isinstance(value, list) else None
    kind = _unwrap(kind, value, dict)
    return _hints(kind)[token], value.get(token) if isinstance(value, dict) else None


@functools.lru_cache(maxsize=None)
def _hints(kind: Any) -> dict[str, Any]:
    return get_type_hints(kind, include_extras=True)


def refusal(
    message: str, load: Callable[[], Any], kind: Any, prefix: str = ""
) -> ApiError:
    """
    The L{ApiError} for msgspec's C{message} about a value of C{kind}.
    C{load} gives the value (decoded anew: only a refused request pays) when
    the message does not name the entry of an object at fault.
    """
    parsed = _AT.match(message)
    assert parsed is not None
    text = parsed.group("text")
    path = parsed.group("inner") if parsed.group("inner") else parsed.group("path") or "$"
    tokens = _tokens(path)
    key_at_fault = parsed.group("inner") is not None
    try:
        if "..." in tokens or key_at_fault:
            return _find_entry(text, load(), kind, tokens, key_at_fault, prefix)
        if text.startswith("Object contains unknown field"):
            name = text.split("`")[1]
            field = _field(prefix, tokens + [name])
            where = kind
            for token in tokens:
                where, _ = _step(where, None, token)
            allowed = ", ".join(sorted(_unwrap(where, want=dict).__struct_fields__))
            return ApiError(
                400, "unknown_field", f"{field}: unknown field; allowed: {allowed}", field
            )
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, RecursionError):
        # The value or its type could not be followed down the path: the
        # field is named as msgspec named it.
        tokens = [t for t in tokens if t != "..."]
    if text.startswith("Object missing required field"):
        field = _field(prefix, tokens + [text.split("`")[1]])
        return ApiError(400, "missing_field", f"{field}: required", field)
    field = _field(prefix, tokens) or "body"
    return ApiError(400, "invalid_field", f"{field}: {_say(text)}", field)


def _find_entry(
    text: str, value: Any, kind: Any, tokens: list[str | int], key_at_fault: bool, prefix: str
) -> ApiError:
    """
    Name the entry of an object at fault, which msgspec leaves out of its
    path (C{$.env[...]}): each entry is checked again, in order.
    """
    where = list(tokens)
    done: list[str | int] = []
    while where and where[0] != "...":
        token = where.pop(0)
        kind, value = _step(kind, value, token)
        done.append(token)
    kind = _unwrap(kind, value, dict)
    key_type, value_type = get_args(kind)
    base = _field(prefix, done)
    for key, item in value.items():
        # An empty key is named by its object.
        name = f"{base}.{key}" if base and key else base or key
        try:
            msgspec.convert(key, key_type, strict=True)
        except msgspec.ValidationError as e:
            return ApiError(400, "invalid_field", f"{name}: {_say(str(e).split(' - at')[0])}", name)
        if not key_at_fault:
            try:
                msgspec.convert(item, value_type, strict=True)
            except msgspec.ValidationError as e:
                return refusal(str(e), lambda: item, value_type, name)
            if text == "Number out of range":
                # (Read by json as infinite, which any value takes.)
                try:
                    storable(item, name)
                except UnservableValue as e:
                    if "not a JSON number" in e.why:
                        return ApiError(
                            400, "invalid_field", f"{e.where}: {_say(text)}", e.where
                        )
    raise ValueError("no entry is at fault")


# Checks msgspec does not make

@attrs.frozen
class Submission:
    """
    One validated job of a request: its spec, and how many jobs to make of
    it (C{array}, or C{None} for one plain job).  C{depends_on} entries that
    are integers name earlier jobs of the same batch.  C{stored_bytes} is
    what an array's members store in all (L{array_bytes}); 0 for a plain
    job, which its request's body bounds.
    """

    spec: JobSpec
    array: Optional[int] = None
    batch_dependencies: tuple[tuple[int, int], ...] = ()
    stored_bytes: int = 0


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


def _parse_time(text: str, field: str) -> float:
    # The pattern of the type has checked the form, the zone and the year.
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        utc = moment.astimezone(datetime.timezone.utc)
    except (ValueError, OverflowError):
        invalid(field, "not a time of the calendar (a day past the month's end?)")
    if not 1970 <= utc.year <= 9998:
        invalid(field, "the time is out of range (1970 to 9998)")
    return moment.timestamp()


def _job_fields(body: JobSubmission, tasks: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """
    Check what a submitted job runs; return those fields of its L{JobSpec}
    (the scheduling fields are L{parse_submission}'s).
    """
    has_command = body.command is not None
    has_task = body.task is not None
    if has_command == has_task:
        raise ApiError(
            400,
            "missing_field" if not has_command else "invalid_field",
            f"{prefix}command: give exactly one of command (an argv list) or task",
            f"{prefix}command",
        )
    spec: dict[str, Any] = {}
    if has_command:
        command = body.command
        if not command[0]:
            invalid(f"{prefix}command[0]", "the program must not be empty")
        if "\x00" in "".join(command):
            i = next(i for i, arg in enumerate(command) if "\x00" in arg)
            invalid(f"{prefix}command[{i}]", PATTERN_MESSAGES[NO_NUL])
        spec["command"] = tuple(command)
        for key in ("args", "kwargs"):
            if getattr(body, key) is not UNSET:
                invalid(f"{prefix}{key}", "only task jobs take args and kwargs")
        if body.env is not UNSET:
            for key in body.env:
                if key.startswith(RESERVED_ENV):
                    invalid(f"{prefix}env.{key}", f"names starting {RESERVED_ENV} are reserved")
            spec["env"] = body.env
    else:
        task = body.task
        if task not in tasks:
            known = ", ".join(sorted(tasks)) or "none are configured"
            raise ApiError(
                400,
                "unknown_task",
                f"{prefix}task: no task named {task!r}; known: {known}",
                f"{prefix}task",
            )
        spec["task"] = task
        if body.env is not UNSET:
            invalid(f"{prefix}env", "only command jobs take env")
        args = [] if body.args is UNSET else body.args
        kwargs = {} if body.kwargs is UNSET else body.kwargs
        for key, value in (("args", args), ("kwargs", kwargs)):
            if _too_deep(value):
                invalid(f"{prefix}{key}", f"arrays and objects nested more than {MAX_NESTING} deep")
        spec["args"] = tuple(args)
        spec["kwargs"] = kwargs
    if body.name is not None:
        spec["name"] = body.name
    if body.labels:
        spec["labels"] = body.labels
    if body.inputs:
        seen: dict[str, int] = {}
        inputs = []
        for i, item in enumerate(body.inputs):
            path = posixpath.normpath(item.path)
            if path in seen:
                invalid(f"{prefix}inputs[{i}].path", f"the same path as inputs[{seen[path]}]")
            seen[path] = i
            sha256 = None if item.sha256 is None else item.sha256.lower()
            inputs.append(InputSpec(url=item.url, path=path, sha256=sha256))
        # Staging writes each input as a file: a path that is a directory
        # of another input's would have to be both.  (One input, the
        # common case, cannot clash: it pays nothing.)
        for i, item in enumerate(inputs if len(inputs) > 1 else ()):
            parent = item.path
            while "/" in parent:
                parent = parent.rpartition("/")[0]
                if parent in seen:
                    j = seen[parent]
                    invalid(
                        f"{prefix}inputs[{j}].path",
                        f"{parent!r} is a directory of inputs[{i}].path ({item.path!r}); "
                        "an input's path names a file",
                    )
        spec["inputs"] = tuple(inputs)
    if body.resources is not None:
        r = body.resources
        spec["resources"] = Resources(float(r.cpus), r.memory_mb, r.gpus)
    if body.requirements:
        spec["requirements"] = body.requirements
    if body.notify is not None:
        # Whether the dispatcher may send it (a secret, the address
        # policy) is the API's to say (it knows the configuration).
        spec["notify"] = Notify(body.notify.url, frozenset(body.notify.events))
    return spec


def parse_submission(
    body: Any,
    tasks: Mapping[str, Any],
    queues: Mapping[str, Any],
    now: float,
    max_array: int,
    prefix: str = "",
    batch_index: Optional[int] = None,
    max_stored_bytes: Optional[int] = None,
) -> Submission:
    """
    Check one submitted job and build its L{Submission}.

    @param body: the L{JobSubmission} (or L{BatchJob}), or its decoded JSON.
    @param tasks: the configured task names.
    @param queues: the configured queues (L{QueueConfig} by name).
    @param now: the time C{delay} counts from.
    @param max_array: the largest C{array} allowed.
    @param prefix: put before field names (for jobs inside a batch).
    @param batch_index: this job's place in a batch, or C{None} outside one
        (where C{depends_on} may not hold integers).
    @param max_stored_bytes: the most an array's members may store in all
        (L{array_bytes}); C{None}: no limit.
    @raise ApiError: naming the first field at fault.
    """
    if not isinstance(body, JobSubmission):
        body = convert(body, JobSubmission if batch_index is None else BatchJob, prefix)
    fields = _job_fields(body, tasks, prefix)
    if (
        body.queue is None and body.priority is None and body.timeout is None
        and body.max_attempts is None and body.retry_delay is None
        and body.not_before is None and body.delay is None
        and body.depends_on is None and body.array is None
    ):
        # The common case, at once: a job that says nothing of its
        # scheduling gets its queue's defaults.
        queue = queues["default"]
        return Submission(JobSpec(**fields, priority=queue.priority, timeout=queue.timeout))
    queue_name = "default" if body.queue is None else body.queue
    if queue_name not in queues:
        raise ApiError(
            400,
            "unknown_queue",
            f"{prefix}queue: no queue named {queue_name!r}; known: {', '.join(sorted(queues))}",
            f"{prefix}queue",
        )
    queue = queues[queue_name]
    fields["queue"] = queue_name
    fields["priority"] = queue.priority if body.priority is None else body.priority
    fields["timeout"] = queue.timeout if body.timeout is None else float(body.timeout)
    if body.max_attempts is not None:
        fields["max_attempts"] = body.max_attempts
    if body.retry_delay is not None:
        fields["retry_delay"] = float(body.retry_delay)
    if body.not_before is not None and body.delay is not None:
        invalid(f"{prefix}delay", "give not_before or delay, not both")
    if body.not_before is not None:
        fields["not_before"] = _parse_time(body.not_before, f"{prefix}not_before")
    if body.delay is not None:
        fields["not_before"] = now + body.delay
    batch_deps: list[tuple[int, int]] = []
    if body.depends_on is not None:
        field = f"{prefix}depends_on"
        depends: list[str] = []
        for i, item in enumerate(body.depends_on):
            if type(item) is int:
                if batch_index is None:
                    invalid(
                        f"{field}[{i}]",
                        "an index names an earlier job of the same batch; use a job id here",
                    )
                if item >= batch_index:
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
                depends.append(item)
        fields["depends_on"] = tuple(depends)
    array = body.array
    stored = 0
    if array is not None:
        if array > max_array:
            invalid(
                f"{prefix}array",
                f"expected an integer from 1 to {max_array} ([dispatcher] max_array), "
                f"got {array}",
            )
        stored = array_bytes(body, array)
        if max_stored_bytes is not None and stored > max_stored_bytes:
            each = stored // array
            invalid(
                f"{prefix}array",
                f"{array} jobs of {each} bytes each would store {stored} bytes, more "
                f"than the {max_stored_bytes} one request may store ([dispatcher] "
                f"max_stored_bytes): at most {max(1, max_stored_bytes // each)} jobs "
                "of this size",
            )
    return Submission(JobSpec(**fields), array, tuple(batch_deps), stored)


def array_bytes(body: JobSubmission, array: int) -> int:
    """
    What the C{array} members of the submitted job C{body} store, as
    C{[dispatcher] max_stored_bytes} counts it: each stores the whole spec,
    counted as the job's JSON as submitted (compact, every field).
    """
    return array * len(msgspec.json.encode(body))


def check_stored_bytes(submissions: list[Submission], max_stored_bytes: int) -> None:
    """
    Refuse a batch whose arrays' members store more than
    C{max_stored_bytes} in all (each array alone was checked as it was
    parsed).
    """
    total = sum(s.stored_bytes for s in submissions)
    if total > max_stored_bytes:
        raise ApiError(
            400,
            "invalid_field",
            f"jobs: the arrays of this batch would store {total} bytes, more than the "
            f"{max_stored_bytes} one request may store ([dispatcher] max_stored_bytes)",
            "jobs",
        )


def check_batch_size(count: int, max_array: int) -> None:
    """
    Refuse a batch of more than C{max_array} jobs.
    """
    if count > max_array:
        raise ApiError(
            400,
            "invalid_field",
            f"jobs: at most {max_array} jobs in one batch ([dispatcher] max_array)",
            "jobs",
        )


def decode_batch(raw: bytes) -> Union[PlainBatch, Batch]:
    """
    A batch's body: as a L{PlainBatch} when every job in it is plain (the
    common bulk submission, decoded into four fields a job), else as a
    L{Batch}, whose errors name the field at fault.
    """
    try:
        return _plain_batch.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return decode(raw, Batch)


_plain_batch = msgspec.json.Decoder(PlainBatch)


def plain_jobs(items: list[Any], tasks: Mapping[str, Any], queue: Any) -> Optional[PlainJobs]:
    """
    The jobs of a batch as L{PlainJobs}, if every one is plain: a command
    and nothing else, or a configured task with nothing but its C{args} and
    C{kwargs}; else C{None}, and the batch is L{parse_submission}'s, which
    names any field at fault.  Each plain job is checked as
    L{parse_submission} would check it, and kept as what it runs
    (L{PlainJobs.work}).

    @param items: the L{PlainJob}s of the batch (or their decoded JSON).
    @param tasks: the configured task names.
    @param queue: the default queue's L{QueueConfig}, whose defaults the
        jobs take.
    """
    if items and type(items[0]) is not PlainJob:
        try:
            items = msgspec.convert(items, list[PlainJob], strict=True)
        except msgspec.ValidationError:
            return None
    work: list[Any] = []
    unset = UNSET
    for item in items:
        command = item.command
        if command is not None:
            if (
                item.task is not None or not command[0] or "\x00" in "".join(command)
                or item.args is not unset or item.kwargs is not unset
            ):
                return None
            work.append(command)
        elif item.task is not None:
            task = item.task
            args = [] if item.args is unset else item.args
            kwargs = {} if item.kwargs is unset else item.kwargs
            if task not in tasks or _too_deep(args) or _too_deep(kwargs):
                return None
            work.append((task, args, kwargs))
        else:
            return None
    return PlainJobs(work, priority=queue.priority, timeout=queue.timeout)
